"""Admission and limits: upstream admission (bounded waits, pending cap, stream
budget), request bodies that stall, request heads bounded while read, client connection
caps, slow and idle clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.standin import StandIn

from .conftest import INLINE_KEY_CONFIG, StartProxy, WriteConfig
from .support import (
    assert_no_tracebacks,
    eventually,
    gauges,
    request,
)
from .support.processes import rss_mib, serving
from .support.rawapi import Answer, HeadAnswer, MakeApi, RawApi, Received, chunked_forever
from .support.rawclient import exchange, json_of, status_of


def hang_up_after(answered: int) -> Answer:
    """An answer for the raw API: on its first connection, `answered` requests get 200, then
    the next is read and the connection closed without a word (as by a server whose
    keep-alive timer fired just then); later connections answer everything."""
    seen = 0

    async def answer(
        received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal seen
        if received.connection == 1:
            seen += 1
            if seen > answered:
                writer.close()
                return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return answer


QUICK_TIMEOUT = {"header_timeout": 0.5}


async def still_serving(proxy: str) -> None:
    async with aiohttp.ClientSession() as http:
        assert (await request(http, "GET", f"{proxy}/still/up")).status == 200


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


@pytest.fixture(autouse=True)
def no_tracebacks_after_each_test(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Refused heads and connections are not errors of the proxy: no traceback."""
    yield
    assert not [r.getMessage() for r in caplog.records if r.exc_info]


async def test_a_request_waits_at_most_pool_timeout_then_gets_503(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """With appcircle.max_connections taken, a request waits at most appcircle.pool_timeout and
    then gets 503 pool_timeout with Retry-After: 1 and a detail naming max_connections."""
    proxy = await start_proxy(appcircle={"max_connections": 1, "pool_timeout": 0.3})
    holder = asyncio.ensure_future(http.get(f"{proxy}/_test/slow?seconds=1.5"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    async with http.get(f"{proxy}/build/v2/profiles") as response:
        waited = time.monotonic() - started
        body = await response.json()
    assert response.status == 503 and body["error"] == "pool_timeout"
    assert response.headers["Retry-After"] == "1"
    assert "appcircle.max_connections" in body["detail"]
    assert 0.25 < waited < 1.2
    (await holder).release()


async def test_beyond_max_pending_a_request_is_refused_at_once(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Once server.max_pending requests already wait for a connection, the next one is refused at
    once with 503 pool_full instead of joining the queue."""
    proxy = await start_proxy(
        appcircle={"max_connections": 1, "pool_timeout": 5}, server={"max_pending": 0}
    )
    holder = asyncio.ensure_future(http.get(f"{proxy}/_test/slow?seconds=1"))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    async with http.get(f"{proxy}/build/v2/profiles") as response:
        assert response.status == 503
        assert (await response.json())["error"] == "pool_full"
    assert time.monotonic() - started < 0.2
    (await holder).release()


async def test_slow_streams_cannot_starve_a_small_call(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Long streams draw on appcircle.max_streams: a stream beyond it gets 503 streams_full at
    once, while short calls keep getting 200 with every stream slot held."""
    standin.events_gate = asyncio.Event()  # the event streams stay open until released
    proxy = await start_proxy(
        appcircle={"max_connections": 2, "max_streams": 2, "pool_timeout": 0.5}
    )
    streams = [await http.get(f"{proxy}/_test/events?count=2") for _ in range(2)]
    assert [s.status for s in streams] == [200, 200]
    # A third stream is refused at once; short calls still go through, again and again.
    async with http.get(f"{proxy}/_test/events?count=2") as refused:
        assert refused.status == 503
        assert (await refused.json())["error"] == "streams_full"
    for _ in range(5):
        async with http.get(f"{proxy}/build/v2/profiles") as response:
            assert response.status == 200
    for stream in streams:
        stream.release()


async def test_a_trickling_upload_is_cut_with_408(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """An upload that stops sending its body for server.body_timeout gets 408 body_timeout within
    2 s, and its upstream request and API connection are dropped with it."""
    proxy = await start_proxy(server={"body_timeout": 0.3})
    head = (
        b"POST /distribution/v2/profiles/p/app-versions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    writer.write(head + b"x" * 1000)
    answer = await asyncio.wait_for(reader.readuntil(b"}"), 3)
    writer.close()
    assert status_of(answer) == 408
    assert b'"body_timeout"' in answer
    assert time.monotonic() - started < 2
    # The upstream request is dropped with it: nothing holds the API's connection.
    await eventually(lambda: standin.in_flight == 0 and standin.api_connections == 0)


async def test_a_stalled_small_body_is_cut_with_408(start_proxy: StartProxy) -> None:
    """A small body that stalls short of its Content-Length gets 408 after server.body_timeout."""
    proxy = await start_proxy(server={"body_timeout": 0.3})
    head = b"POST /build/v2/profiles HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n"
    answer = await exchange(proxy, head + b"abc", read_for=2)
    assert status_of(answer) == 408


async def test_a_token_that_expired_while_waiting_for_a_connection_is_never_sent(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A token that expires while its request waits for a free connection is checked again after
    the wait and replaced, so the API never sees an expired token, not even one replayed after a
    401."""
    standin.token_lifetime = 2.0
    proxy = await start_proxy(
        appcircle={"max_connections": 1, "pool_timeout": 5}, server={"eager": True}
    )
    async with http.get(f"{proxy}/build/v2/profiles") as warm:
        assert warm.status == 200
    holder = asyncio.ensure_future(http.get(f"{proxy}/_test/slow?seconds=3.3"))
    await asyncio.sleep(0.1)
    async with http.get(f"{proxy}/build/v2/profiles") as response:
        assert response.status == 200
    (await holder).release()
    # Not even a 401 replayed out of sight: the expired token never left the proxy.
    assert standin.rejected_tokens == []


async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """The proxy itself answers Expect: 100-continue with 100, then forwards the POST with its
    body and without the Expect header."""
    proxy = await start_proxy()
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /build/v2/profiles HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert final.startswith(b"HTTP/1.1 200")
    writer.close()
    await eventually(lambda: any(r.method == "POST" for r in standin.api_requests))
    seen = next(r for r in standin.api_requests if r.method == "POST")
    assert "expect" not in {name.lower() for name, _ in seen.headers}


async def test_a_stale_kept_alive_connection_is_retried_only_for_idempotent_requests(
    start_proxy: StartProxy, http: aiohttp.ClientSession, raw_api: MakeApi
) -> None:
    """A kept-alive API connection closed as a request arrives is retried on a fresh connection
    for a GET, but a POST is never sent twice: it gets 502 upstream_unreachable."""
    api = await raw_api(hang_up_after(1))
    proxy = await start_proxy(appcircle={"api_url": api.url})
    assert (await request(http, "GET", f"{proxy}/a")).status == 200
    # The API closes the kept-alive connection as this GET arrives: sent again, fresh.
    assert (await request(http, "GET", f"{proxy}/b")).status == 200
    assert [r.path for r in api.received] == ["/a", "/b", "/b"]

    api = await raw_api(hang_up_after(1))
    proxy = await start_proxy(appcircle={"api_url": api.url})
    assert (await request(http, "GET", f"{proxy}/a")).status == 200
    # A POST is never sent twice: the API may have acted on it.
    reply = await request(http, "POST", f"{proxy}/b", data=b"once")
    assert reply.status == 502 and reply.json()["error"] == "upstream_unreachable"
    assert [r.path for r in api.received] == ["/a", "/b"]


async def test_uploads_too_big_to_replay_draw_on_the_stream_budget(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An upload larger than tokens.replay_limit draws on appcircle.max_streams (503 pool_timeout
    naming the streams budget when full), while small bodies and GETs are not held up."""
    proxy = await start_proxy(
        appcircle={"max_connections": 4, "max_streams": 1, "pool_timeout": 0.3},
        tokens={"replay_limit": 1000},
    )
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    # One upload that trickles holds the only stream slot.
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    refused = await request(http, "POST", f"{proxy}/upload", data=b"y" * 5000)
    assert refused.status == 503 and refused.json()["error"] == "streams_full"
    assert "appcircle.max_streams" in refused.json()["detail"]
    # Calls are not held up by it, small bodies included.
    assert (await request(http, "POST", f"{proxy}/small", data=b"z" * 500)).status == 200
    assert (await request(http, "GET", f"{proxy}/build/v2/profiles")).status == 200
    writer.close()


async def test_an_upload_beyond_the_stream_budget_is_refused_at_once_before_its_body(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """An upload too big to replay needs a stream slot; with max_streams spent it gets 503
    streams_full at once (not pool_timeout after a wait), before 100 Continue invites its
    body and before any of the body is read."""
    standin.events_gate = asyncio.Event()  # the event stream stays open until released
    proxy = await start_proxy(
        appcircle={"max_streams": 1, "pool_timeout": 5}, tokens={"replay_limit": 1000}
    )
    stream = await http.get(f"{proxy}/_test/events?count=2")
    assert stream.status == 200
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    writer.write(
        b"POST /distribution/v2/profiles/p/app-versions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await asyncio.wait_for(reader.readuntil(b"}"), 1.0)
    took = time.monotonic() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:40]  # no 100 Continue before it
    assert json_of(answer)["error"] == "streams_full"
    assert took < 0.5
    assert not any(seen.raw_path.endswith("app-versions") for seen in standin.api_requests)
    stream.release()


async def test_a_websocket_beyond_the_stream_budget_is_refused_at_once(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A second WebSocket with max_streams spent gets 503 streams_full at once."""
    proxy = await start_proxy(appcircle={"max_streams": 1, "pool_timeout": 5})
    async with http.ws_connect(f"{proxy}/_test/ws") as first:
        await first.send_str("hello")
        assert await first.receive_str() == "echo: hello"
        started = time.monotonic()
        async with http.get(
            f"{proxy}/_test/ws",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        ) as second:
            body = await second.json()
        assert time.monotonic() - started < 0.5
        assert second.status == 503 and body["error"] == "streams_full"


async def test_a_flood_of_slow_calls_on_one_path_leaves_room_for_every_other_path(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """200 concurrent slow calls to one resource may hold at most appcircle.flow_share of
    the connections and of the waiting slots; the excess is refused at once (flow_full),
    and small GETs to other paths meanwhile keep >= 95% success with p99 <= 1 s."""
    proxy = await start_proxy(
        appcircle={"max_connections": 10, "pool_timeout": 2}, server={"max_pending": 20}
    )
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as slow,
        aiohttp.ClientSession(timeout=timeout) as small,
    ):
        assert (await request(small, "GET", f"{proxy}/build/v2/profiles")).status == 200

        async def slow_call() -> tuple[int, str, float]:
            started = time.monotonic()
            reply = await request(slow, "GET", f"{proxy}/_test/slow?seconds=3")
            error = reply.json().get("error", "") if reply.status != 200 else ""
            return reply.status, error, time.monotonic() - started

        flood = [asyncio.ensure_future(slow_call()) for _ in range(200)]
        await eventually(lambda: standin.in_flight >= 5)
        probes = [await slow_call() for _ in range(5)]  # once the burst has been met
        took: list[float] = []
        statuses: list[int] = []
        for number in range(40):
            started = time.monotonic()
            reply = await request(small, "GET", f"{proxy}/build/v2/profiles?n={number}")
            took.append(time.monotonic() - started)
            statuses.append(reply.status)
            await asyncio.sleep(0.02)
        assert standin.in_flight >= 5  # the flood was still on
        slow_answers = await asyncio.gather(*flood)
    assert statuses.count(200) >= 0.95 * len(statuses), statuses
    assert sorted(took)[int(len(took) * 0.99) - 1] <= 1.0
    assert standin.max_in_flight <= 5 + 1  # the slow flow's share, and a small GET
    refusals = [took for status, error, took in slow_answers if error == "flow_full"]
    assert len(refusals) >= 100
    # At once, not after pool_timeout (2 s), even amid the burst of 200 connections; and
    # a client arriving after it is refused in milliseconds.
    assert sorted(refusals)[len(refusals) // 2] <= 0.5
    assert all(error == "flow_full" for _, error, _ in probes)
    assert sorted(took for _, _, took in probes)[2] <= 0.1


async def test_truncated_body_is_dropped_and_the_proxy_keeps_serving(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up partway through a declared Content-Length body leaves no traceback and
    the proxy keeps serving others."""
    proxy = await start_proxy()
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await still_serving(proxy)
    assert_no_tracebacks(caplog)


async def test_body_longer_than_declared_never_reaches_the_api_beyond_its_length(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """Bytes past the declared Content-Length are read as a next request and refused 400; if the
    first request was forwarded, it carried exactly its 5 declared bytes."""
    proxy = await start_proxy()
    answer = await exchange(
        proxy,
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhelloEXTRA BYTES\r\n\r\n",
        read_for=0.5,
    )
    # The surplus reads as a next request, which is garbage: refused, connection closed.
    # Arriving in the same packet, it gets the whole connection refused before anything
    # is forwarded; if the first request did go out, it carried exactly 5 bytes.
    assert b" 400 Bad Request" in answer
    if status_of(answer) == 200:
        body = answer.partition(b"\r\n\r\n")[2]
        assert b'"body_length": 5' in body
    else:
        assert standin.api_requests == []
    await still_serving(proxy)


async def test_slowloris_header_trickle_is_cut_off(start_proxy: StartProxy) -> None:
    """A client trickling its request head one byte at a time is disconnected within
    server.header_timeout (well under 3 s), and the proxy keeps serving."""
    proxy = await start_proxy(server=QUICK_TIMEOUT)
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    closed = False
    try:
        for byte in b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
    except ConnectionError:
        closed = True
    finally:
        writer.close()
    assert closed, "the server kept a trickling connection open"
    assert time.monotonic() - started < 3
    await still_serving(proxy)


async def test_a_thousand_idle_connections_do_not_stop_service_and_are_closed(
    start_proxy: StartProxy,
) -> None:
    """A thousand idle connections do not stop the proxy answering others, and each is closed once
    server.header_timeout passes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    proxy = await start_proxy(server={"header_timeout": 1.0})
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(1000)]
    try:
        await still_serving(proxy)
        await asyncio.sleep(1.5)
        results = await asyncio.gather(
            *(asyncio.wait_for(reader.read(1), 2) for reader, _ in idle), return_exceptions=True
        )
        assert all(result == b"" or isinstance(result, ConnectionError) for result in results)
    finally:
        for _, writer in idle:
            writer.close()
    await still_serving(proxy)


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


async def test_a_client_that_stops_reading_a_download_does_not_hold_a_stream_forever(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
    http: aiohttp.ClientSession,
) -> None:
    """A client that stops reading a streamed download loses its stream slot after
    server.send_timeout, so the streams gauge drops back to 0 instead of one stalled client holding
    max_streams forever."""
    api = await scripted_api(chunked_forever(0.0))
    proxy = await start_proxy(
        appcircle={"api_url": api.url, "max_streams": 1, "read_timeout": 0.3},
        server={"send_timeout": 1.0},
    )
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")  # then reads nothing more, and never hangs up
    await asyncio.sleep(0.5)
    key = 'appcircle_proxy_upstream_connections{state="streams"}'
    assert (await gauges(http, proxy))[key] == 1
    # A client that accepts no byte for server.send_timeout (1 s) loses its stream.
    await asyncio.sleep(3)
    try:
        assert (await gauges(http, proxy))[key] == 0
    finally:
        writer.close()


async def test_full_connection_pool_makes_requests_wait_not_fail(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """With appcircle.max_connections = 2, six concurrent requests all get 200 by waiting their
    turn, and the API never sees more than two at once."""
    # One flow may use the whole pool here (flow_share 1): this is about waiting, not fairness.
    proxy = await start_proxy(appcircle={"max_connections": 2, "flow_share": 1})
    replies = await asyncio.gather(
        *(request(http, "GET", f"{proxy}/_test/slow?seconds=0.2") for _ in range(6))
    )
    assert [reply.status for reply in replies] == [200] * 6
    assert standin.max_in_flight == 2
