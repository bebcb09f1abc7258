"""Inbound bounds: a request head is limited while it is read, so an oversized one costs
about the limit and gets 431; client connections beyond server.max_client_connections get
an immediate 503; bodies and WebSocket messages are never mistaken for a head."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.standin import StandIn

from .conftest import INLINE_KEY_CONFIG, StartProxy, WriteConfig
from .processes import rss_mib, serving
from .rawhttp import status_of
from .support import request

SMALL = {"max_url_length": 256, "max_header_bytes": 4096, "max_header_count": 20}


def endpoint(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def endless_head(url: str, line: bytes, lines: int) -> bytes:
    """Send a request head that never ends (`lines` header lines, no blank line) while
    reading; return what the server answers before it closes."""
    reader, writer = await asyncio.open_connection(*endpoint(url))
    answer = asyncio.create_task(reader.read())
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
        for index in range(lines):
            if answer.done():
                break
            writer.write(b"X-Filler-%d: " % index + line + b"\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        return await asyncio.wait_for(answer, 3)
    finally:
        writer.close()


async def test_an_endless_head_gets_431_once_it_passes_the_limit(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """A request head that never ends gets 431 headers_too_large naming server.max_header_bytes
    once its total size passes the bound, is never forwarded, and the proxy keeps serving."""
    proxy = await start_proxy(server=SMALL)
    # Each line is within the parser's field limit, and there are no more of them than its
    # header count limit: only the total can stop this head.
    answer = await endless_head(proxy, b"v" * 2000, lines=40)
    assert status_of(answer) == 431
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"] == "headers_too_large" and "server.max_header_bytes" in body["detail"]
    assert standin.api_requests == []
    async with aiohttp.ClientSession() as http:
        assert (await request(http, "GET", f"{proxy}/still/up")).status == 200


async def test_an_endless_head_after_a_kept_alive_request_is_cut(
    start_proxy: StartProxy,
) -> None:
    """An endless head sent on a kept-alive connection after a first request is cut too: the
    connection closes without hanging and without a second answer."""
    proxy = await start_proxy(server=SMALL)
    reader, writer = await asyncio.open_connection(*endpoint(proxy))
    try:
        writer.write(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status_of(await reader.readuntil(b"\r\n\r\n")) == 200
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
        for index in range(40):
            writer.write(b"X-Filler-%d: " % index + b"v" * 2000 + b"\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        # The rest of the first answer, then the end: no second answer, no hang.
        rest = b""
        with contextlib.suppress(ConnectionError):
            rest = await asyncio.wait_for(reader.read(), 3)
        assert b"HTTP/1.1" not in rest
    finally:
        writer.close()


async def test_an_endless_head_after_a_declined_websocket_upgrade_is_cut(
    start_proxy: StartProxy,
) -> None:
    """An endless head sent on a connection kept after a refused WebSocket upgrade (400) is cut
    as well, so the bound holds after an upgrade attempt."""
    proxy = await start_proxy(server=SMALL)
    reader, writer = await asyncio.open_connection(*endpoint(proxy))
    try:
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"  # no key: refused, and the connection kept
        )
        assert status_of(await reader.readuntil(b"\r\n\r\n")) == 400
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
        for index in range(40):
            writer.write(b"X-Filler-%d: " % index + b"v" * 2000 + b"\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        rest = b""
        with contextlib.suppress(ConnectionError):
            rest = await asyncio.wait_for(reader.read(), 3)
        assert b"HTTP/1.1" not in rest
    finally:
        writer.close()


async def test_a_body_pipelined_behind_a_full_request_queue_is_not_counted_as_a_head(
    start_proxy: StartProxy,
) -> None:
    """aiohttp parses at most 32 queued requests at once and parses the rest later from its
    own code (not from data_received); a request parsed that way must still start a body,
    so its large body is never counted as an endless head (the head bound is fenced in
    serve/aiohttp_private.py, which sees every queued request)."""
    proxy = await start_proxy(server=SMALL)
    size = 200_000  # far beyond the head bound of SMALL (about 5 KiB)
    reader, writer = await asyncio.open_connection(*endpoint(proxy))
    try:
        gets = b"".join(b"GET /g/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % n for n in range(40))
        post = b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % size
        writer.write(gets + post)
        # Once the 40 GETs are answered, aiohttp has parsed the POST from its own buffer.
        answered = b""
        while answered.count(b"HTTP/1.1 200 ") < 40:
            answered += await asyncio.wait_for(reader.read(65536), 5)
        for _ in range(size // 10_000):
            writer.write(b"b" * 10_000)
            await writer.drain()
        writer.write(b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answers = answered + await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answers.count(b"HTTP/1.1 200 ") == 42
    assert b'"body_length": %d' % size in answers


async def test_bodies_and_websocket_messages_larger_than_a_head_pass(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Request bodies and WebSocket messages far larger than the head bound pass, again and again
    on one kept-alive connection: only heads are bounded."""
    proxy = await start_proxy(server=SMALL)
    body = b"b" * 300_000
    for _ in range(3):  # kept alive: a second head after a body is counted afresh
        reply = await request(http, "POST", f"{proxy}/upload", data=body)
        assert reply.status == 200 and reply.json()["body_length"] == len(body)
    async with http.ws_connect(f"{proxy}/_test/ws") as socket_:
        for _ in range(3):
            await socket_.send_str("m" * 50_000)
            assert await socket_.receive_str() == "echo: " + "m" * 50_000


async def test_heads_are_still_checked_in_full_under_the_bound(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A head under the read bound but over server.max_header_bytes still gets 431
    headers_too_large."""
    proxy = await start_proxy(server=SMALL)
    big = {f"X-H{i}": "v" * 1000 for i in range(5)}  # over max_header_bytes, under the bound
    reply = await request(http, "GET", f"{proxy}/x", headers=big)
    assert (reply.status, reply.json()["error"]) == (431, "headers_too_large")


# -- connections ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def idle_connections(
    url: str, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    opened = [await asyncio.open_connection(*endpoint(url)) for _ in range(count)]
    try:
        yield opened
    finally:
        for _, writer in opened:
            writer.close()


async def test_connections_beyond_the_cap_get_an_immediate_503(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """A connection beyond server.max_client_connections is answered 503 too_many_connections at
    once and closed, the held ones are still served, and a freed place is taken up again."""
    proxy = await start_proxy(server={"max_client_connections": 5})
    async with idle_connections(proxy, 5) as held:
        await asyncio.sleep(0.05)  # all five accepted
        reader, writer = await asyncio.open_connection(*endpoint(proxy))
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 2)  # answered and closed, not queued
        writer.close()
        assert status_of(answer) == 503
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["error"] == "too_many_connections"
        assert "server.max_client_connections" in body["detail"]
        assert standin.api_requests == []
        # The held connections are still served.
        reader, writer = held[0]
        writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status_of(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)) == 200
        held[1][1].close()
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:  # a freed place is taken up again
            assert (await request(http, "GET", f"{proxy}/x")).status == 200


# -- memory, measured on a real process --------------------------------------------------


async def test_25_endless_heads_of_32k_lines_cost_little_memory(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """Twenty-five concurrent endless heads of 32 KiB lines all get 431 while the process's RSS
    grows by less than 25 MiB: an oversized head costs about the bound, not its size."""
    config = write_config(credentials=INLINE_KEY_CONFIG)
    async with serving(config) as (proxy, process):
        before = rss_mib(process.pid)
        line = b"v" * (32 * 1024 - 32)
        answers = await asyncio.gather(*(endless_head(proxy, line, lines=300) for _ in range(25)))
        grown = rss_mib(process.pid) - before
        assert {status_of(answer) for answer in answers} == {431}
        # 25 heads of 300 such lines are 240 MiB; each may cost about the 41 KiB bound.
        assert grown < 25, f"RSS grew by {grown:.0f} MiB"


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Refused heads and connections are not errors of the proxy: no traceback."""
    yield
    assert not [r.getMessage() for r in caplog.records if r.exc_info]


async def test_the_listen_backlog_holds_max_client_connections(start_proxy: StartProxy) -> None:
    """Issue 17, point 8: the listen queue is sized for server.max_client_connections, so a
    burst of connections waits to be accepted (and refused at once if over the limit)
    instead of overflowing asyncio's default backlog of 100 into SYN retries a second late."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to read the listen backlog")
    proxy = await start_proxy(server={"max_client_connections": 700})
    _, port = endpoint(proxy)
    listing = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    backlog = int(listing[2])  # Send-Q of a listening socket: its backlog
    assert backlog >= min(700, int(Path("/proc/sys/net/core/somaxconn").read_text()))


async def test_the_head_count_restarts_with_each_request_on_a_kept_alive_connection(
    start_proxy: StartProxy,
) -> None:
    """The inbound head bound is per request: a long-lived client whose heads arrive in
    pieces, each well within the bound but together far beyond it, is never cut."""
    proxy = await start_proxy(server={"max_header_bytes": 1024, "max_url_length": 256})
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"p" * 500 + b"\r\n\r\n"
    try:
        for _ in range(10):  # 10 heads of ~550 bytes against a bound of 2,304
            for start in range(0, len(head), 200):
                writer.write(head[start : start + 200])
                await writer.drain()
                await asyncio.sleep(0.01)
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert status_of(answer) == 200
            length = next(
                int(line.split(b":")[1])
                for line in answer.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
    finally:
        writer.close()
