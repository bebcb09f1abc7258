"""Giving memory back after a burst of long streams.

A thousand slow downloads leave their freed buffers behind twice over: in reference cycles
(the frames of cancelled handlers keep body chunks alive until the cycle collector runs,
which an idle process does not do) and in glibc's heap, which keeps freed memory mapped
while it is fragmented among live objects. Measured with bench/slow_clients.py: RSS stayed
at its 720 MiB peak a minute after the streams ended; with one `gc.collect()` and
`malloc_trim(0)` once the stream budget is idle again it fell back to 83 MiB.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from collections.abc import Callable
from typing import Final

from ..upstream.pool import Budget

__all__ = ["give_back_after_streams"]

log = logging.getLogger("appcircle_proxy.memory")

CHECK_EVERY: Final = 5.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS), where there is nothing to do."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    return trim


async def give_back_after_streams(streams: Budget, every: float = CHECK_EVERY) -> None:
    """Runs for the life of the process: each time the stream budget, having been busy, is
    found idle, collect cycles and hand freed heap memory back to the system."""
    trim = _malloc_trim()
    busy = False
    while True:
        await asyncio.sleep(every)
        if streams.in_use:
            busy = True
            continue
        if busy:
            busy = False
            collected = gc.collect()
            if trim is not None:
                trim(0)
            log.debug("streams idle: collected %d objects, returned freed memory", collected)
