"""Memory is handed back once a burst of long streams is over, and only then."""

from __future__ import annotations

import asyncio
import platform

import pytest

from proxy.serve import memory
from proxy.upstream.pool import Budget

from .support import eventually


async def test_memory_is_given_back_once_each_time_the_streams_go_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """give_back_after_streams runs gc.collect and malloc_trim(0) once each time the streams
    budget goes from busy to idle: never while streams run, never while idle throughout, not
    every tick."""
    collections: list[int] = []
    trims: list[int] = []
    monkeypatch.setattr(memory.gc, "collect", lambda: collections.append(1) or 0)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: trims.append(pad) or 1)
    streams = Budget("streams", 10)
    task = asyncio.ensure_future(memory.give_back_after_streams(streams, every=0.01))
    try:
        await asyncio.sleep(0.05)
        assert collections == []  # never busy: nothing to give back
        streams.in_use = 3
        await asyncio.sleep(0.05)
        assert collections == []  # busy: never in the middle of the streams
        streams.in_use = 0
        await eventually(lambda: len(collections) == 1)
        await asyncio.sleep(0.05)
        assert (len(collections), trims) == (1, [0])  # once per burst, not every tick
        streams.in_use = 1
        await asyncio.sleep(0.03)
        streams.in_use = 0
        await eventually(lambda: len(collections) == 2)
    finally:
        task.cancel()


def test_malloc_trim_is_found_on_glibc_or_skipped_elsewhere() -> None:
    """_malloc_trim() returns a callable malloc_trim that answers 0 or 1, or None where the C
    library has none, without raising."""
    trim = memory._malloc_trim()
    if platform.libc_ver()[0] == "glibc":
        assert trim is not None  # on glibc the lookup must succeed, or nothing is ever trimmed
    assert trim is None or trim(0) in (0, 1)
