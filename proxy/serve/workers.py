"""`--workers N`: the supervisor forks N worker processes, relays signals to them, and
re-forks one that dies (after a backoff), so the port keeps all N. The listening sockets
are bound once, before the supervisor starts, and every worker inherits and serves them."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Final

from ..config.settings import Settings

__all__ = ["Supervisor", "Target", "WorkerRole"]

log = logging.getLogger("appcircle_proxy.server")

# A worker that dies is re-forked after RESTART_INITIAL seconds, doubling up to RESTART_MAX
# while it keeps dying within STABLE_SECONDS of its start.
RESTART_INITIAL: Final = 0.5
RESTART_MAX: Final = 30.0
STABLE_SECONDS: Final = 10.0


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """Which of several processes this is: its slot, how often the slot was re-forked,
    and the pipe on which it tells the parent it is serving. (A pipe, not a lock-based
    multiprocessing.Event: a worker killed while holding that lock would hang the parent.)"""

    index: int
    restarts: int
    ready: Connection
    # Private to this run (0700): where workers answer each other's metrics (siblings.py).
    metrics_dir: Path | None = None


# What each worker process runs: it serves, and tells the supervisor on `role.ready`.
Target = Callable[[Settings, Callable[[], Settings], WorkerRole], None]


@dataclass(slots=True)
class _Slot:
    """One of the N places on the port, and the process that holds it now."""

    index: int
    process: BaseProcess
    ready: Connection  # the read end of the worker's pipe
    started: float
    restarts: int = 0
    delay: float = RESTART_INITIAL
    # Set once the supervisor has seen the process exit; then, unless stopping, when to
    # fork its replacement.
    exited: bool = False
    restart_at: float = 0.0


class Supervisor:
    """The parent of --workers: forks them, relays signals, and re-forks one that dies
    (after a backoff) so the port keeps all N. A first worker that exits with an error
    before it ever served is a start-up error: all stop, exit 1."""

    def __init__(
        self, settings: Settings, load: Callable[[], Settings], workers: int, target: Target
    ) -> None:
        # fork, not spawn: workers inherit the validated settings and the loader as they are.
        self._context = multiprocessing.get_context("fork")
        self._settings = settings
        self._load = load
        self._workers = workers
        self._target = target
        self._stopping = False
        self._failed = False
        self._slots: list[_Slot] = []
        self._metrics_dir: Path | None = None

    def _fork(self, index: int, restarts: int) -> _Slot:
        ready, told = self._context.Pipe(duplex=False)
        role = WorkerRole(index, restarts, told, self._metrics_dir)
        process = self._context.Process(
            target=self._target, args=(self._settings, self._load, role), name=f"worker-{index}"
        )
        process.start()
        told.close()  # the worker's end; later workers must not inherit it
        return _Slot(index, process, ready, time.monotonic(), restarts)

    def _relay(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM):
            self._stopping = True
            signum = signal.SIGTERM
        for slot in self._slots:
            if slot.process.pid is not None and slot.process.exitcode is None:
                os.kill(slot.process.pid, signum)

    def run(self) -> int:
        try:
            self._metrics_dir = Path(tempfile.mkdtemp(prefix="appcircle-proxy-"))
        except OSError as err:  # a read-only file system with no writable TMPDIR, say
            log.warning(
                "no private directory for the workers to share their metrics (%s): each "
                "scrape of /_proxy/metrics shows one worker's; set TMPDIR to a writable one",
                err.strerror or err,
            )
        try:
            return self._supervise()
        finally:
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _supervise(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._relay)
        for index in range(self._workers):
            self._slots.append(self._fork(index, 0))
        if self._stopping:  # a signal arrived while forking
            self._relay(signal.SIGTERM, None)
        while True:
            for slot in self._slots:
                self._tend(slot)
            # Every process not yet seen to exit is watched, so no exit goes unnoticed.
            watched = [slot.process.sentinel for slot in self._slots if not slot.exited]
            if self._stopping and not watched:
                break
            due = [slot.restart_at for slot in self._slots if slot.exited]
            timeout = None if self._stopping or not due else max(0.0, min(due) - time.monotonic())
            multiprocessing.connection.wait(watched, timeout)
        if self._failed:
            log.error("a worker could not start; see above")
            return 1
        return 0

    def _tend(self, slot: _Slot) -> None:
        process = slot.process
        if not slot.exited:
            code = process.exitcode
            if code is None:
                return
            slot.exited = True
            if self._stopping:
                return
            # An error exit before serving is a start-up error; a signal is not.
            if code > 0 and slot.restarts == 0 and not _served(slot.ready):
                log.error("worker %d %s before serving", slot.index, _how(process))
                self._failed = True
                self._relay(signal.SIGTERM, None)
                return
            now = time.monotonic()
            if now - slot.started >= STABLE_SECONDS:
                slot.delay = RESTART_INITIAL
            slot.restart_at = now + slot.delay
            log.error(
                "worker %d (pid %s) %s; re-forking it in %.1f s (restart %d)",
                slot.index,
                process.pid,
                _how(process),
                slot.delay,
                slot.restarts + 1,
            )
            return
        if self._stopping or time.monotonic() < slot.restart_at:
            return
        slot.ready.close()
        replacement = self._fork(slot.index, slot.restarts + 1)
        replacement.delay = min(slot.delay * 2, RESTART_MAX)
        self._slots[self._slots.index(slot)] = replacement
        if self._stopping:  # a signal arrived while forking: the new worker missed it
            self._relay(signal.SIGTERM, None)


def _served(ready: Connection) -> bool:
    """Whether a worker that has exited said it was serving (so reading cannot block)."""
    try:
        return ready.poll() and ready.recv_bytes() == b"serving"
    except EOFError:
        return False


def _how(process: BaseProcess) -> str:
    code = process.exitcode
    assert code is not None
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"
