"""Upstream admission and request-body progress, through the proxy: a bounded wait for a
connection, a bounded queue, a separate budget for long streams, the token checked again
after the wait, and uploads that stall."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.standin import StandIn

from .conftest import StartProxy
from .rawapi import Answer, MakeApi, Received
from .rawhttp import exchange, json_of, status_of
from .support import eventually, request


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


# -- streams_full at once (issue 17, point 6) ----------------------------------------------


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


# -- fair under overload (issue 17, point 8) -----------------------------------------------


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
