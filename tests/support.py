"""The one way tests do common things: an HTTP request read to the end, polling for a
condition, and a proxy config built from dicts."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

Table = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    """A response read to its end: what a test asserts on, with no connection left open."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(http: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any) -> Reply:
    """Send one request (kwargs go to aiohttp as they are) and read the whole answer."""
    async with http.request(method, url, **kwargs) as response:
        return Reply(response.status, response.headers, await response.read())


async def eventually(condition: Callable[[], bool | Awaitable[bool]], within: float = 3.0) -> None:
    """Wait, polling, until `condition()` holds; fail after `within` seconds. The condition
    may be a coroutine function, to poll over HTTP."""
    deadline = time.monotonic() + within
    while True:
        holds = condition()
        if inspect.isawaitable(holds):
            holds = await holds
        if holds:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The test's log records at ERROR or above, or with a traceback: a clean failure has
    none."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR or r.exc_info
    ]


def proxy_config(
    api_url: str,
    auth_url: str,
    *,
    credentials: Table,
    routes: Table | None = None,
    server: Table | None = None,
    appcircle: Table | None = None,
    tokens: Table | None = None,
    log: Table | None = None,
    clients: Table | None = None,
) -> dict[str, Any]:
    """A config document for the proxy in front of the Appcircle at `api_url`/`auth_url`.
    Each given table is laid over the test defaults: any port, lazy start (so tests see
    the first exchange happen on demand) and fast retries."""
    document: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "eager": False, **(server or {})},
        "appcircle": {"api_url": api_url, "auth_url": auth_url, **(appcircle or {})},
        "tokens": {"retry_initial": 0.05, "retry_max": 0.2, **(tokens or {})},
        "credentials": credentials,
    }
    if log is not None:
        document["log"] = log
    if routes is not None:
        document["routes"] = routes
    if clients is not None:
        document["clients"] = clients
    # Deep, so a test that edits its document cannot change a shared constant.
    return copy.deepcopy(document)
