"""The access log: one line per request, pre-formatted and written in batches.

A `logging` call per request cost about 14% of the proxy's CPU; here a line is one string
appended to a list, and the list is written every 50 ms and at exit. Text and JSON lines
carry the same fields. aiohttp calls `AccessLogger.log` once a response has been sent,
which is also where the request's traffic statistics are recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Final, Literal, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..paths import HEALTH_PATH, READY_PATH
from .facts import ERROR_CODE, FACTS, NO_CLIENT, Facts
from .stats import NO_ROUTE, Stats

__all__ = ["LOGGER_NAME", "AccessLog", "access_logger"]

LOGGER_NAME: Final = "appcircle_proxy.access"
FLUSH_EVERY: Final = 0.05
# Probes every few seconds would drown the log; their failures are still logged.
QUIET_PATHS: Final = frozenset({HEALTH_PATH, READY_PATH})


class AccessLog:
    """Lines waiting to be written, and the writer."""

    def __init__(
        self,
        stream: Callable[[], TextIO],
        fmt: Literal["text", "json"],
        *,
        query_strings: bool,
        worker: int | None,
        enabled: bool,
    ) -> None:
        self._stream = stream
        self._json = fmt == "json"
        self.query_strings = query_strings
        self._worker = worker
        self.enabled = enabled
        self._lines: list[str] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""

    def add(
        self,
        request: web.BaseRequest,
        path: str,
        facts: Facts | None,
        status: int,
        error: str | None,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
    ) -> None:
        now = time.time()
        if self.query_strings:
            path = request.raw_path
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = peer[0] if isinstance(peer, tuple) else "local"
        route = facts.route if facts is not None else NO_ROUTE
        upstream_status = facts.upstream_status if facts is not None else None
        request_id = facts.request_id if facts is not None else None
        client_name = facts.client if facts is not None else NO_CLIENT
        if self._json:
            entry = {
                "time": self._timestamp(now),
                "level": "info",
                "logger": LOGGER_NAME,
                "message": f"{request.method} {path} {status}",
                "method": request.method,
                "path": path,
                "status": status,
                "route": route,
                "upstream_status": upstream_status,
                "error": error,
                "duration_ms": round(seconds * 1000, 1),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "client": client,
                "request_id": request_id,
                "client_name": None if client_name == NO_CLIENT else client_name,
            }
            if self._worker is not None:
                entry["worker"] = self._worker
            line = json.dumps(entry)
        else:
            line = (
                f"{self._timestamp(now)} INFO {LOGGER_NAME}: {request.method} {path} {status} "
                f"route={route} upstream_status={upstream_status or '-'} "
                f"error={error or '-'} duration_ms={seconds * 1000:.1f} bytes_in={bytes_in} "
                f"bytes_out={bytes_out} client={client} request_id={request_id or '-'} "
                f"client_name={client_name}"
            )
            if self._worker is not None:
                line += f" worker={self._worker}"
        self._lines.append(line)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        stream = self._stream()
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed under us (a pipe whose reader left): nothing to tell

    def _timestamp(self, now: float) -> str:
        """As the other log lines have it (logs.py): ISO 8601 UTC in JSON, logging's local
        `asctime` in text; the part down to the second is formatted once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                if self._json
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            )
        millis = int((now - second) * 1000)
        if self._json:
            return f"{self._second_text}.{millis:03d}+00:00"
        return f"{self._second_text},{millis:03d}"


def access_logger(log: AccessLog, stats: Stats) -> type[AbstractAccessLogger]:
    """The class aiohttp instantiates to report each answered request."""

    class AccessLogger(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            facts = request.get(FACTS)
            route = facts.route if facts is not None else NO_ROUTE
            bytes_in = request.content.total_bytes
            # By class, not isinstance: responses are MutableMappings, and an ABC check
            # costs more than the rest of this line.
            if response.__class__ is web.Response:
                body = response.body
                bytes_out = len(body) if isinstance(body, bytes) else 0
            else:
                bytes_out = facts.bytes_out if facts is not None else 0
            status = response.status
            stats.record(
                route,
                request.method,
                status,
                bytes_in,
                bytes_out,
                facts.upstream_seconds if facts is not None else None,
            )
            if facts is not None and facts.client != NO_CLIENT:
                stats.record_client(facts.client, route, status)
            if not log.enabled:
                return
            # The raw path: decoding it (request.path) costs a URL parse per request.
            path = request.raw_path.partition("?")[0]
            if status < 300 and path in QUIET_PATHS:
                return
            # The proxy's own answers, which carry an error code, are all 4xx or 5xx; a
            # lookup that misses raises a KeyError inside, so it is not made for the rest.
            error = response.get(ERROR_CODE) if status >= 400 else None
            log.add(request, path, facts, status, error, bytes_in, bytes_out, time)

        @property
        def enabled(self) -> bool:
            return True

    return AccessLogger


def enabled_by_level() -> bool:
    return logging.getLogger(LOGGER_NAME).isEnabledFor(logging.INFO)
