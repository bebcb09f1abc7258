"""The one way tests do common things: an HTTP request read to the end, polling for a
condition, and a proxy config built from dicts."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
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


def listener_certificate(ca: trustme.CA, directory: Path, name: str) -> dict[str, str]:
    """A certificate for 127.0.0.1 signed by `ca`, as the two files server.tls_* name."""
    issued = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
    cert, key = directory / "tls.crt", directory / "tls.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return {"tls_cert_file": str(cert), "tls_key_file": str(key)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def gauges(http: aiohttp.ClientSession, proxy: str) -> dict[str, float]:
    text = (await request(http, "GET", f"{proxy}/_proxy/metrics")).body.decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(("appcircle_proxy_upstream_connections", "appcircle_proxy_pending")):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def path_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """A refused or broken client is not an error of the proxy: no traceback logged."""
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of `text` as a JSON object; fails on any line that is not one."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries
