"""/_proxy/metrics with --workers: one scrape shows the whole proxy.

The request path keeps its plain ints (stats.py); only a scrape pays. Each worker answers
its own snapshot on a Unix socket in a directory the supervisor made for this run (mode
0700); the worker a scrape lands on asks its siblings, adds their snapshots to its own and
renders the sum. So that counters never go backwards, the last snapshot seen of each worker
is kept in that directory: a worker that died adds its last-seen counts to a retired sum,
and one that is alive but slow to answer counts with its last-seen numbers meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..telemetry.stats import Series, Snapshot, merge

__all__ = ["Siblings"]

# How long a scrape waits for a sibling's snapshot (it is busy, not dead: see above).
ASK_TIMEOUT: Final = 1.0
STATE: Final = "seen.json"


@dataclass(frozen=True, slots=True)
class _Seen:
    pid: int
    restarts: int
    snapshot: Snapshot


def _encode(entry: _Seen) -> dict[str, Any]:
    return {
        "pid": entry.pid,
        "restarts": entry.restarts,
        "snapshot": entry.snapshot.as_data(),
    }


def _decode(data: dict[str, Any]) -> _Seen:
    return _Seen(int(data["pid"]), int(data["restarts"]), Snapshot.from_data(data["snapshot"]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Siblings:
    """This worker's place among the --workers: answers its snapshot, gathers everyone's."""

    def __init__(
        self, directory: Path, index: int, restarts: int, snapshot: Callable[[], Snapshot]
    ) -> None:
        self._directory = directory
        self._index = index
        self._restarts = restarts
        self._snapshot = snapshot
        self._path = directory / f"worker-{index}.sock"
        self._server: asyncio.AbstractServer | None = None

    def _own(self) -> _Seen:
        return _Seen(os.getpid(), self._restarts, self._snapshot())

    async def start(self) -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(json.dumps(_encode(self._own())).encode())
                await writer.drain()
            finally:
                writer.close()

        # The socket of this slot's previous worker, if it died, is stale.
        self._path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(answer, self._path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._path.unlink(missing_ok=True)

    async def _ask(self, path: Path) -> tuple[int, _Seen] | None:
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(path)
                try:
                    data = await reader.read()
                finally:
                    writer.close()
            index = int(path.stem.removeprefix("worker-"))
            return index, _decode(json.loads(data))
        except (OSError, TimeoutError, ValueError, KeyError):
            return None

    async def gather(self) -> tuple[Snapshot, int]:
        """Every worker's metrics summed, and how many workers answered."""
        paths = [path for path in self._directory.glob("worker-*.sock") if path != self._path]
        answers = await asyncio.gather(*(self._ask(path) for path in paths))
        live = {self._index: self._own()}
        live.update(answer for answer in answers if answer is not None)
        restarts_total: Series = ("worker_restarts",)
        with self._state() as state:
            seen: dict[str, dict[str, Any]] = state.setdefault("seen", {})
            retired = Snapshot.from_data(state.get("retired", {"counters": [], "gauges": []}))
            restarts: dict[str, int] = state.setdefault("restarts", {})
            standing_in: list[Snapshot] = []
            for key, data in list(seen.items()):
                earlier = _decode(data)
                now = live.get(int(key))
                if now is not None and now.pid == earlier.pid:
                    continue
                if now is None and _alive(earlier.pid):
                    # Alive but slow to answer: its last-seen counts stand in for it.
                    standing_in.append(Snapshot(counters=earlier.snapshot.counters))
                    continue
                # Gone: what it had counted stays counted.
                retired = merge([retired, Snapshot(counters=earlier.snapshot.counters)])
                del seen[key]
            for index, entry in live.items():
                seen[str(index)] = _encode(entry)
                restarts[str(index)] = max(restarts.get(str(index), 0), entry.restarts)
            state["retired"] = retired.as_data()
            total = merge([retired, *standing_in, *(entry.snapshot for entry in live.values())])
            total.counters[restarts_total] = sum(restarts.values())
        return total, len(live)

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The shared record of what each worker last counted, read and written under a
        lock, since two workers may be scraped at once."""
        path = self._directory / STATE
        with (self._directory / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
                yield state
                temporary = path.with_suffix(".tmp")
                temporary.write_text(json.dumps(state))
                temporary.replace(path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
