"""Logging: one line per event, as text for people or JSON for Loki, CloudWatch or Datadog.

Every record may carry structured fields in `extra={"fields": {...}}`; the text format
appends them as key=value, the JSON format merges them into the object. Lifecycle events
(`listening`, `stopped`) go to stdout through `event()`: in text a readable banner, in JSON
one object like every other line. A line written by a worker process (`--workers`) says which.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final

from ..config.settings import LogSettings

__all__ = ["NOTICES", "configure", "event", "refusal"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LIFECYCLE: Final = logging.getLogger("appcircle_proxy.lifecycle")
# What `run` tells the CI step (where it serves, why CMD did not run): on stderr whatever the
# log level, as "appcircle-proxy: ..." in text and one object like every other line in JSON.
NOTICES: Final = logging.getLogger("appcircle_proxy.run")
# server.serve names its worker processes worker-0, worker-1, ...
_WORKER_NAME: Final = re.compile(r"worker-(\d+)")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _worker(record: logging.LogRecord) -> int | None:
    match = _WORKER_NAME.fullmatch(record.processName or "")
    return int(match[1]) if match else None


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        worker = _worker(record)
        if worker is not None:  # last, as on the access log's lines
            fields = {**fields, "worker": worker}
        if not fields:
            return line
        return line + " " + " ".join(f"{key}={value}" for key, value in fields.items())


class BannerFormatter(logging.Formatter):
    """Lifecycle events in text mode: the text for people, as it is."""

    def format(self, record: logging.LogRecord) -> str:
        text = str(getattr(record, "text", None) or record.getMessage())
        worker = _worker(record)
        if worker is None:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first} worker={worker}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        worker = _worker(record)
        if worker is not None:
            entry["worker"] = worker
        entry.update(_fields(record))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(settings: LogSettings) -> None:
    """Replace the root logger's handlers with one on stderr in the configured format, and
    send lifecycle events to stdout in the same format."""
    json_lines = settings.format == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(JsonFormatter() if json_lines else BannerFormatter())
    LIFECYCLE.handlers[:] = [out]
    LIFECYCLE.propagate = False
    # Where the proxy listens is said whatever the log level.
    LIFECYCLE.setLevel(logging.INFO)
    notices = logging.StreamHandler(sys.stderr)
    notices.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("appcircle-proxy: %(message)s")
    )
    NOTICES.handlers[:] = [notices]
    NOTICES.propagate = False
    NOTICES.setLevel(logging.INFO)


def event(name: str, summary: str, fields: dict[str, Any], text: str | None = None) -> None:
    """Tell the operator about the process's life: `summary` (or the longer `text`, in text
    mode) for people, `name` and `fields` for a log pipeline."""
    LIFECYCLE.info(summary, extra={"fields": {"event": name, **fields}, "text": text})


def refusal(message: str, json_lines: bool) -> None:
    """A start-up refusal (a configuration the proxy cannot start with), said before
    logging is configured: one line on stderr, JSON when the log format asked for it."""
    if json_lines:
        record = logging.LogRecord("appcircle_proxy", logging.ERROR, "", 0, message, None, None)
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(f"appcircle-proxy: {message}", file=sys.stderr)
