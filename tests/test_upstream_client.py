"""The pooled upstream client: keep-alive, framing, timeouts, TLS to the API, and
what a broken or hostile API can and cannot make it do (a scripted raw API server)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Final

import aiohttp
import pytest
import trustme

from proxy.upstream.connection import HIGH_WATER, READ_SIZE, UpstreamError, UpstreamTimeout
from proxy.upstream.pool import Limits, Pool, Refused
from tests.support.standin import StandIn

from .conftest import PERSONAL_KEY, ROOT_ORG, StartProxy
from .support import errors_logged, path_of, request
from .support.rawapi import Answer, HeadAnswer, MakeApi, RawApi, Received, chunked_forever
from .support.rawclient import exchange, status_of


@pytest.fixture
def private_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    bundle = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return ca, bundle


async def tls_standin(ca: trustme.CA) -> StandIn:
    appcircle = StandIn()
    appcircle.add_personal_key(PERSONAL_KEY, ROOT_ORG)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    await appcircle.start(tls=server_context)
    return appcircle


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


MakePool = Callable[..., Awaitable[tuple[Pool, "Scripted"]]]


REQUEST = b"GET /x HTTP/1.1\r\nHost: upstream\r\n\r\n"


class Scripted:
    """A server that runs `script` on each connection and counts the connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.fixture
async def scripted() -> AsyncIterator[MakePool]:
    servers: list[Scripted] = []
    pools: list[Pool] = []

    async def make(script: Script, **limits: float) -> tuple[Pool, Scripted]:
        server = Scripted(script)
        await server.start()
        servers.append(server)
        settings = {
            "max_connections": 4,
            "max_streams": 4,
            "max_pending": 4,
            "pool_timeout": 0.5,
            "connect_timeout": 1.0,
            "read_timeout": 1.0,
            **limits,
        }
        pool = Pool(
            "127.0.0.1",
            server.port,
            None,
            Limits(
                max_connections=int(settings["max_connections"]),
                max_streams=int(settings["max_streams"]),
                max_pending=int(settings["max_pending"]),
                pool_timeout=settings["pool_timeout"],
                connect_timeout=settings["connect_timeout"],
                read_timeout=settings["read_timeout"],
                flow_share=settings.get("flow_share", 1.0),
            ),
        )
        pools.append(pool)
        return pool, server

    yield make
    for pool in pools:
        pool.close()
    for server in servers:
        await server.close()


async def fetch(pool: Pool, request: bytes = REQUEST, *, head_only: bool = False) -> bytes:
    lease = await pool.acquire(stream=False)
    try:
        lease.connection.send(request, head_only=head_only)
        lease.connection.body_sent()
        await lease.connection.response()
        return await lease.connection.read_all()
    finally:
        pool.release(lease)


OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


REFUSED: Final = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"


def endless(first: bytes, repeat: bytes) -> Answer:
    """An answer that starts with `first` and then sends `repeat` for ever (until the
    connection breaks); a GET of /small is answered at once."""

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if got.path == "/small":
            writer.write(OK)
            return
        writer.write(first)
        while True:
            writer.write(repeat)
            await writer.drain()

    return answer


def answering(raw: bytes) -> Answer:
    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw if got.path == "/x" else OK)

    return answer


def chunk_sizes(answer: bytes) -> list[int]:
    """The sizes of the chunks of a chunked answer, as the proxy framed them."""
    rest = answer.partition(b"\r\n\r\n")[2]
    sizes = []
    while rest:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line, 16)
        sizes.append(size)
        rest = rest[size + 2 :]
        if not size:
            break
    return sizes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_101_from_the_api_is_a_clean_502_without_a_traceback(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 101 Switching Protocols the API sends to a plain GET is answered 502 to the client, with no
    error or traceback in the log."""

    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )

    api = await scripted_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url, "read_timeout": 1})
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 502
    assert errors_logged(caplog) == []


async def test_a_second_response_pipelined_by_the_api_never_reaches_the_client(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
) -> None:
    """Extra response bytes the API writes after its answer are dropped: a pipelined client gets the
    first answer's 5-byte body and never the API's unsolicited second response."""

    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if path_of(head) == b"/a":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
            )
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    api = await scripted_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    answered = await exchange(
        proxy,
        b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\nGET /b HTTP/1.1\r\nHost: localhost\r\n\r\n",
        read_for=0.5,
    )
    first, _, rest = answered.partition(b"\r\n\r\n")
    assert b"Content-Length: 5" in first
    assert rest.startswith(b"hello") and b"evil" not in rest


async def test_a_post_the_api_carried_out_is_never_answered_retry_later(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
    http: aiohttp.ClientSession,
) -> None:
    """A POST the API received and answered 201 reaches the client as 201 even while max_streams is
    taken, never as a retry-later refusal that would make the client create it twice."""
    api = await scripted_api(chunked_forever(0.05))
    proxy = await start_proxy(
        appcircle={"api_url": api.url, "max_streams": 1, "max_connections": 4}
    )
    async with http.get(f"{proxy}/stream") as holder:  # holds the one stream slot
        assert holder.status == 200
        reply = await request(http, "POST", f"{proxy}/create", data=b'{"name": "x"}')
        assert [path_of(h) for h in api.heads].count(b"/create") == 1  # the API acted on it
        # ...so the client must get the API's answer, not "retry shortly".
        assert reply.status == 201, reply.body


@pytest.mark.xfail(
    strict=True,
    reason="aiohttp's server writes every header value as UTF-8, so bytes that are not UTF-8 "
    "cannot pass unchanged: the proxy reads them as ISO-8859-1 and they leave re-encoded "
    "(documented in the README, Forwarding)",
)
async def test_header_bytes_that_are_not_utf8_pass_through_unchanged(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
) -> None:
    """Records the known limit (strict xfail): a non-UTF-8 byte in an API header such as
    Content-Disposition leaves the proxy re-encoded; it fails loudly if aiohttp starts passing it.
    """

    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b'HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename="caf\xe9.txt"\r\n'
            b"Content-Length: 2\r\n\r\nok"
        )

    api = await scripted_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    answered = await exchange(
        proxy, b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    # The latin-1 byte \xe9 must not come back as the UTF-8 pair \xc3\xa9.
    assert b'filename="caf\xe9.txt"' in answered, answered


async def test_a_status_code_out_of_range_is_not_relayed_as_a_broken_status_line(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
) -> None:
    """An API status outside 100-599 (here 099) becomes a 502, not a status line the client cannot
    parse."""

    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok")

    api = await scripted_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    answered = await exchange(
        proxy, b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    # "HTTP/1.1 99 Odd" is no status line a client can parse; the API's answer is unreadable.
    assert status_of(answered) == 502, answered


async def test_connect_timeout_gives_504(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An API host that never completes the TCP handshake gets 504 after appcircle.connect_timeout,
    well within 3 s."""
    # A listener that never accepts, its backlog full: new connections hang in SYN.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            fillers.append(filler)
        host, port = silent.getsockname()
        proxy = await start_proxy(
            appcircle={"api_url": f"http://{host}:{port}", "connect_timeout": 0.3}
        )
        started = time.monotonic()
        assert (await request(http, "GET", f"{proxy}/x")).status == 504
        assert time.monotonic() - started < 3
    finally:
        for filler in fillers:
            filler.close()
        silent.close()


async def test_self_hosted_behind_a_private_ca_is_trusted_through_ca_file(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    private_ca: tuple[trustme.CA, Path],
) -> None:
    """A self-hosted Appcircle with a private CA is reached over TLS when appcircle.ca_file names
    the CA, and without it the client gets 503 auth_unreachable mentioning the certificate."""
    ca, bundle = private_ca
    appcircle = await tls_standin(ca)
    try:
        assert appcircle.api_url.startswith("https://")
        urls = {"api_url": appcircle.api_url, "auth_url": appcircle.auth_url}
        trusted = await start_proxy(appcircle={**urls, "ca_file": str(bundle)})
        assert (await request(http, "GET", f"{trusted}/build/v2/profiles")).status == 200
        untrusted = await start_proxy(appcircle=urls)
        reply = await request(http, "GET", f"{untrusted}/build/v2/profiles")
        assert reply.status == 503
        body = reply.json()
        assert body["error"] == "auth_unreachable" and "certificate" in body["detail"].lower()
    finally:
        await appcircle.close()


async def test_insecure_skip_verify_works_but_is_logged_loudly(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    private_ca: tuple[trustme.CA, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """appcircle.insecure_skip_verify lets the proxy reach an untrusted TLS host, and a warning "TLS
    VERIFICATION IS OFF" is logged."""
    appcircle = await tls_standin(private_ca[0])
    try:
        proxy = await start_proxy(
            appcircle={
                "insecure_skip_verify": True,
                "api_url": appcircle.api_url,
                "auth_url": appcircle.auth_url,
            }
        )
        assert (await request(http, "GET", f"{proxy}/x")).status == 200
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("TLS VERIFICATION IS OFF" in warning for warning in warnings)
    finally:
        await appcircle.close()


async def test_keep_alive_connection_carries_the_next_request(scripted: MakePool) -> None:
    """A kept-alive upstream connection carries the next requests: three fetches use one
    connection, which then sits idle in the pool."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    pool, server = await scripted(script)
    assert [await fetch(pool) for _ in range(3)] == [b"ok"] * 3
    assert server.connections == 1
    assert pool.idle == 1


async def test_close_delimited_body_is_read_to_the_end_and_not_reused(scripted: MakePool) -> None:
    """A body delimited by Connection: close is read to the end of the connection, and the
    connection is not returned to the pool."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 100_000)
        await writer.drain()

    pool, server = await scripted(script)
    assert await fetch(pool) == b"x" * 100_000
    assert pool.idle == 0


async def test_chunked_body_with_trailers_is_whole_and_the_connection_kept(
    scripted: MakePool,
) -> None:
    """A chunked body with trailers is read whole, trailers excluded, and the connection is
    reused for the next request."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n"
            )

    pool, server = await scripted(script)
    assert await fetch(pool) == b"hello world"
    assert await fetch(pool) == b"hello world"
    assert server.connections == 1


async def test_head_response_has_no_body_and_the_connection_serves_on(scripted: MakePool) -> None:
    """A HEAD answer's Content-Length is reported but no body is read, so the connection is not
    desynchronised and serves the next request."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        assert head.startswith(b"HEAD ")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")

    pool, server = await scripted(script)
    lease = await pool.acquire(stream=False)
    lease.connection.send(b"HEAD /x HTTP/1.1\r\nHost: u\r\n\r\n", head_only=True)
    lease.connection.body_sent()
    response = await lease.connection.response()
    assert response.content_length == 1000
    assert await lease.connection.read_all() == b""
    pool.release(lease)
    assert await fetch(pool) == b"abc"
    assert server.connections == 1


async def test_interim_answers_are_skipped(scripted: MakePool) -> None:
    """Interim 1xx answers (100 Continue, 103 Early Hints) are skipped: the final status and only
    its headers and body are returned."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"
        )

    pool, server = await scripted(script)
    lease = await pool.acquire(stream=False)
    lease.connection.send(REQUEST)
    lease.connection.body_sent()
    response = await lease.connection.response()
    assert response.status == 201
    assert [name for name, _ in response.headers] == [b"Content-Length"]
    assert await lease.connection.read_all() == b"done"
    pool.release(lease)


async def test_a_kept_alive_connection_closed_by_the_server_fails_replayably(
    scripted: MakePool,
) -> None:
    """A reused connection the server closes before answering fails with a replayable
    UpstreamError, so the request can safely be sent again on a fresh connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Reads the next request, then hangs up without a word, as a server whose
        # keep-alive timer fired just then would.
        await read_head(reader)

    pool, server = await scripted(script)
    assert await fetch(pool) == b"ok"
    lease = await pool.acquire(stream=False)
    assert lease.connection.reused
    lease.connection.send(REQUEST)
    lease.connection.body_sent()
    with pytest.raises(UpstreamError) as failure:
        await lease.connection.response()
    assert failure.value.replayable
    pool.release(lease)


async def test_a_connection_cut_mid_body_is_not_replayable(scripted: MakePool) -> None:
    """A connection cut partway through the response body fails with an UpstreamError that is not
    replayable, since the server already answered."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()

    pool, server = await scripted(script)
    with pytest.raises(UpstreamError) as failure:
        await fetch(pool)
    assert not failure.value.replayable


async def test_silence_beyond_the_read_timeout_fails_the_exchange(scripted: MakePool) -> None:
    """A server silent for longer than read_timeout after the request fails the exchange with
    UpstreamTimeout."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(5)

    pool, server = await scripted(script, read_timeout=0.2)
    with pytest.raises(UpstreamTimeout):
        await fetch(pool)


async def test_reading_pauses_while_the_consumer_is_slow(scripted: MakePool) -> None:
    """While nobody consumes a 50 MiB body the connection stops reading at HIGH_WATER plus one
    read, so TCP holds the server back; the body is then received in full."""
    sent = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 52428800\r\n\r\n")
        chunk = b"x" * 65536
        while sent < 52_428_800:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()

    pool, server = await scripted(script)
    lease = await pool.acquire(stream=True)
    lease.connection.send(REQUEST)
    lease.connection.body_sent()
    await lease.connection.response()
    await asyncio.sleep(0.3)  # nobody reads: the proxy must stop reading too
    buffered = lease.connection._current().buffered
    assert buffered <= HIGH_WATER + READ_SIZE
    assert sent < 20_000_000  # the server is held back by TCP, not buffered by us
    received = 0
    while chunk := await lease.connection.read():
        received += len(chunk)
    assert received == 52_428_800
    pool.release(lease)


async def test_admission_waits_for_a_slot_then_refuses(scripted: MakePool) -> None:
    """Admission refuses with pool_full beyond max_pending and with pool_timeout after
    pool_timeout, while a stream still gets a connection from its separate budget; all counters
    return to 0."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    pool, server = await scripted(script, max_connections=1, max_pending=1, pool_timeout=0.2)
    held = await pool.acquire(stream=False)
    waiting = asyncio.ensure_future(pool.acquire(stream=False))
    await asyncio.sleep(0.01)
    with pytest.raises(Refused) as full:
        await pool.acquire(stream=False)
    assert full.value.kind == "pool_full"
    with pytest.raises(Refused) as late:
        await waiting
    assert late.value.kind == "pool_timeout"
    # The stream budget is separate: a stream still gets a connection.
    stream = await pool.acquire(stream=True)
    pool.release(stream)
    pool.release(held)
    assert (pool.calls.in_use, pool.streams.in_use, pool.pending) == (0, 0, 0)


async def test_one_flow_holds_at_most_its_share_and_a_freed_slot_skips_its_waiters(
    scripted: MakePool,
) -> None:
    """The per-flow cap (issue 17, point 8): with flow_share 0.5 of 4 connections, a flow
    holds 2; its third call waits for one of its own, its waiting share (2 of 4) full, the
    next is refused at once (flow_full); another flow still gets a connection, and a slot
    it frees goes past the capped flow's waiter to the first waiter below its cap."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    pool, _ = await scripted(script, max_pending=4, pool_timeout=2, flow_share=0.5)
    slow, other = ("api", "_test/slow"), ("api", "build/v2/profiles")
    held = [await pool.acquire(stream=False, flow=slow) for _ in range(2)]
    slow_waiters = [asyncio.ensure_future(pool.acquire(stream=False, flow=slow)) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(Refused) as refused:
        await pool.acquire(stream=False, flow=slow)
    assert refused.value.kind == "flow_full"
    others = [await pool.acquire(stream=False, flow=other) for _ in range(2)]  # room left
    waiting_other = asyncio.ensure_future(pool.acquire(stream=False, flow=other))
    await asyncio.sleep(0.01)
    pool.release(others[0])  # the slow flow's waiters came first, but are at their cap
    lease = await asyncio.wait_for(waiting_other, 1)
    assert not any(waiter.done() for waiter in slow_waiters)
    pool.release(held[0])  # now one of the slow flow's own
    first = await asyncio.wait_for(slow_waiters[0], 1)
    for leased in (lease, others[1], held[1], first):
        pool.release(leased)
    second = await asyncio.wait_for(slow_waiters[1], 1)
    pool.release(second)
    assert (pool.calls.in_use, pool.calls.held, pool.pending) == (0, {}, 0)


@pytest.mark.timeout(120)
async def test_a_request_reaches_the_api_at_most_once_more_whatever_401s_and_losses_befall_it(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession
) -> None:
    """Guards issue 17.1: a replay after a 401 goes at most once, and a replay whose
    connection dies is a 502; a POST is never acted on twice. Every sequence of three API
    behaviours (401, hang up without an answer, 200), on a fresh and on a reused
    connection, for a POST and a GET."""
    plan: list[str] = []

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if got.path == "/warm":
            writer.write(OK)
        elif got.path == "/cold":  # leaves no connection in the pool
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            writer.close()
        else:
            action = plan.pop(0) if plan else "ok"
            if action == "401":
                writer.write(REFUSED)
            elif action == "ok":
                writer.write(OK)
            else:
                writer.close()

    api = await raw_api(answer)
    proxy = await start_proxy(
        appcircle={"api_url": api.url, "read_timeout": 5},
        tokens={"min_renew_interval": 0},
    )
    outcome = {"401": 401, "ok": 200, "close": 502}
    for number, (method, warm, sequence) in enumerate(
        itertools.product(("POST", "GET"), (True, False), itertools.product(outcome, repeat=3))
    ):
        await request(http, "GET", f"{proxy}/{'warm' if warm else 'cold'}")
        plan[:] = list(sequence)
        path = f"/case{number}"
        reply = await request(
            http, method, f"{proxy}{path}", data=b"x" if method == "POST" else None
        )
        applied = sequence[: 3 - len(plan)]
        case = (method, warm, sequence, applied)
        sent = [got for got in api.received if got.path == path]
        assert len(sent) == len(applied), case
        assert reply.status == outcome[applied[-1]], case
        if "401" in applied:
            assert len(applied) - applied.index("401") <= 2, case  # one replay at most
        if method == "POST":
            assert [a for a in applied if a != "401"].count("ok") + applied.count("close") <= 1, (
                case
            )


@pytest.mark.parametrize(
    ("first", "repeat"),
    [
        (b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"f" * 1000 + b"\r\n"),
        (b"HTTP/1.1 200 OK\r\nX-Endless: ", b"v" * 4096),
        (b"HTTP/1.1 200 O", b"K" * 4096),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: ",
            b"t" * 4096,
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=", b"e" * 4096),
    ],
    ids=["header-lines", "header-value", "reason", "trailer", "chunk-extension"],
)
async def test_an_endless_response_head_is_a_502_and_other_requests_go_on(
    start_proxy: StartProxy,
    raw_api: MakeApi,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    first: bytes,
    repeat: bytes,
) -> None:
    """Guards issue 17.2: the response head, each of its lines, trailers and chunk
    extensions are bounded; past the bound the client gets 502 upstream_bad_response at
    once (not after read_timeout: bytes keep coming), and small requests are unaffected."""
    api = await raw_api(endless(first, repeat))
    proxy = await start_proxy(appcircle={"api_url": api.url, "read_timeout": 30})
    async with asyncio.timeout(10):
        endless_request = asyncio.ensure_future(request(http, "GET", f"{proxy}/endless"))
        small = await request(http, "GET", f"{proxy}/small")
        assert small.status == 200
        if b"chunked" in first:
            # The head went to the client before the trailer or extension began: only a
            # cut connection can tell it the answer failed.
            with pytest.raises(aiohttp.ClientPayloadError):
                await endless_request
        else:
            reply = await endless_request
            assert reply.status == 502, reply.body
            assert reply.json()["error"] == "upstream_bad_response"
    assert errors_logged(caplog) == []


@pytest.mark.parametrize(("size", "status"), [(900, 200), (1100, 502)])
async def test_the_response_line_limit_is_a_setting(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession, size: int, status: int
) -> None:
    """Guards issue 17.2: appcircle.max_response_line bounds each header line."""

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: %s\r\n%s" % (b"l" * (size - 8), OK[17:]))

    api = await raw_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url, "max_response_line": 1000})
    assert (await request(http, "GET", f"{proxy}/x")).status == status


async def test_a_control_byte_in_the_reason_phrase_is_replaced_and_the_request_counted(
    start_proxy: StartProxy,
    raw_api: MakeApi,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guards issue 17.3: a reason phrase aiohttp cannot write (a control byte) is replaced
    by the standard one; the answer is relayed, logged and counted, with no traceback."""
    api = await raw_api(answering(b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok"))
    proxy = await start_proxy(appcircle={"api_url": api.url})
    answered = await exchange(proxy, b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n", read_for=0.5)
    assert answered.startswith(b"HTTP/1.1 200 OK\r\n") and answered.endswith(b"\r\n\r\nok")
    metrics = (await request(http, "GET", f"{proxy}/_proxy/metrics")).body.decode()
    assert 'method="GET",route="default",status_class="2xx"} 1.0' in metrics
    assert errors_logged(caplog) == []


async def test_a_control_byte_in_a_header_value_is_a_clean_502(
    start_proxy: StartProxy,
    raw_api: MakeApi,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guards issue 17.3: a header value no client may be sent gives the proxy's JSON 502,
    counted, with no traceback."""
    api = await raw_api(
        answering(b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok")
    )
    proxy = await start_proxy(appcircle={"api_url": api.url})
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 502 and reply.json()["error"] == "upstream_bad_response"
    metrics = (await request(http, "GET", f"{proxy}/_proxy/metrics")).body.decode()
    assert 'method="GET",route="default",status_class="5xx"} 1.0' in metrics
    assert errors_logged(caplog) == []


async def test_body_bytes_that_arrive_together_leave_together(
    start_proxy: StartProxy, raw_api: MakeApi
) -> None:
    """Guards issue 17.4: 64 KiB sent as one-byte chunks costs per read, not per chunk: the
    proxy writes far fewer chunks to the client than the API sent."""
    body = bytes(range(256)) * 256

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body))))
        writer.write(b"0\r\n\r\n")

    api = await raw_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    answered = await exchange(
        proxy, b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", read_for=10
    )
    sizes = chunk_sizes(answered)
    assert sum(sizes) == len(body)
    assert len(sizes) < 100, len(sizes)


@pytest.mark.parametrize("coding", [b"chunked, identity", b"xchunked"])
async def test_a_transfer_coding_the_parser_reads_to_the_close_is_relayed_whole(
    start_proxy: StartProxy,
    raw_api: MakeApi,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    coding: bytes,
) -> None:
    """Guards issue 17.5: one framing decision, the parser's. With chunked not the last
    coding, the body runs to the connection's close (RFC 9112, 6.3), and is relayed whole,
    never as a cut chunked body."""
    raw_body = b"5\r\nhello\r\n0\r\n\r\n"

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n%s" % (coding, raw_body))
        writer.close()

    api = await raw_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    reply = await request(http, "GET", f"{proxy}/x")
    assert (reply.status, reply.body) == (200, raw_body)
    assert "mid-response" not in caplog.text


async def test_failed_connects_give_their_call_slots_back(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession
) -> None:
    """A connect that fails frees its call slot: after max_connections failed connects,
    requests succeed as soon as the API is back (not 503 pool_timeout)."""
    port = free_port()
    proxy = await start_proxy(
        appcircle={
            "api_url": f"http://127.0.0.1:{port}",
            "max_connections": 2,
            "pool_timeout": 0.3,
        }
    )
    for _ in range(3):
        reply = await request(http, "GET", f"{proxy}/x")
        assert reply.status == 502 and reply.json()["error"] == "upstream_unreachable"
    api = RawApi(answering(OK))
    await api.start(port)
    try:
        replies = await asyncio.gather(*(request(http, "GET", f"{proxy}/x") for _ in range(2)))
        assert [reply.status for reply in replies] == [200, 200]
    finally:
        await api.close()


async def test_the_silence_timer_restarts_with_every_byte_that_arrives(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession
) -> None:
    """read_timeout counts silence, not the whole answer: a body streamed steadily for
    three times read_timeout is relayed whole."""

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
        for _ in range(30):
            await asyncio.sleep(0.05)
            writer.write(b"s")
            await writer.drain()

    api = await raw_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url, "read_timeout": 0.5})
    reply = await request(http, "GET", f"{proxy}/slow")
    assert (reply.status, reply.body) == (200, b"s" * 30)


async def test_a_close_delimited_body_cut_by_a_reset_cuts_the_client_connection(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession
) -> None:
    """A body delimited by the connection's close ends only at a clean close: a reset
    mid-body is a failure, passed on by cutting the client's connection."""

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"c" * 1000)
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, not a close

    api = await raw_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    with pytest.raises(aiohttp.ClientPayloadError):
        await request(http, "GET", f"{proxy}/download")


async def test_a_connection_answered_before_its_upload_ended_is_never_reused(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession
) -> None:
    """When the API answers while a streamed upload is still going, the rest of the body
    would reach it as the next request: that connection must never carry another."""

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)  # at once, reading no body

    api = RawApi(answer, read_body=False)
    await api.start()
    proxy = await start_proxy(appcircle={"api_url": api.url}, tokens={"replay_limit": 1024})

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"u" * 2048
            await asyncio.sleep(0.1)

    try:
        async with aiohttp.ClientSession() as uploader:
            upload = await request(uploader, "POST", f"{proxy}/upload", data=trickle())
        assert upload.status == 200
        for _ in range(3):
            assert (await request(http, "GET", f"{proxy}/next")).status == 200
        (first,) = [got.connection for got in api.received if got.path == "/upload"]
        assert [got.path for got in api.received if got.connection == first] == ["/upload"]
    finally:
        await api.close()


@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
async def test_a_reused_connection_that_dies_inside_the_response_head_is_not_replayed(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession, method: str
) -> None:
    """Part of a response head means the API had the request: whatever the method, it is
    not sent again, even on a kept-alive connection (where a silent close would be)."""

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if got.path == "/warm":
            writer.write(OK)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-")
            await writer.drain()
            writer.close()

    api = await raw_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    assert (await request(http, "GET", f"{proxy}/warm")).status == 200
    reply = await request(http, method, f"{proxy}/once", data=b"b" if method != "GET" else None)
    assert reply.status == 502
    assert [got.path for got in api.received] == ["/warm", "/once"]
    assert api.received[1].connection == api.received[0].connection  # it was reused


async def test_an_answer_with_connection_close_never_goes_back_to_the_pool(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession
) -> None:
    """`Connection: close` from the API ends that connection's use, even when the API
    leaves it open."""

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if got.path == "/last":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        else:
            writer.write(OK)

    api = await raw_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    for path in ("/last", "/after"):
        assert (await request(http, "GET", f"{proxy}{path}")).status == 200
    connection = {got.path: got.connection for got in api.received}
    assert connection["/after"] != connection["/last"]


async def test_max_connections_holds_and_waiting_calls_keep_their_turn(
    scripted: MakePool,
) -> None:
    """A connection given back goes to the call that waited longest: a new call cannot
    take it first (even while it sits idle for a moment), and the API never sees more than
    max_connections connections at once."""
    open_now = most = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        try:
            while True:
                await read_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        finally:
            open_now -= 1

    pool, server = await scripted(script, max_connections=2, pool_timeout=2.0)
    held = [await pool.acquire(stream=False) for _ in range(2)]
    for lease in held:
        lease.connection.send(REQUEST)
        lease.connection.body_sent()
        await lease.connection.response()
        await lease.connection.read_all()
    order: list[str] = []

    async def call(name: str) -> None:
        lease = pool.lease_now(stream=False) or await pool.acquire(stream=False)
        order.append(name)
        await asyncio.sleep(0.05)
        pool.release(lease)

    first = asyncio.ensure_future(call("waited"))
    await asyncio.sleep(0.01)
    pool.release(held[0])  # kept alive: idle, and the slot handed to the waiting call
    second = asyncio.ensure_future(call("new"))
    await asyncio.gather(first, second)
    pool.release(held[1])
    assert order == ["waited", "new"]
    assert most <= 2 and pool.calls.in_use == 0


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_of_exactly_replay_limit_bytes_is_kept_and_replayed(
    start_proxy: StartProxy, raw_api: MakeApi, http: aiohttp.ClientSession, chunked: bool
) -> None:
    """replay_limit is inclusive: a body of exactly that size (with a length, or chunked)
    is kept, so a 401 is replayed with a new token instead of reaching the client."""
    refused = False

    async def answer(got: Received, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal refused
        writer.write(OK if refused else REFUSED)
        refused = True

    async def in_pieces() -> AsyncIterator[bytes]:
        yield b"r" * 600
        yield b"r" * 400

    api = await raw_api(answer)
    proxy = await start_proxy(
        appcircle={"api_url": api.url},
        tokens={"replay_limit": 1000, "min_renew_interval": 0},
    )
    reply = await request(
        http, "POST", f"{proxy}/upload", data=in_pieces() if chunked else b"r" * 1000
    )
    assert reply.status == 200
    assert [got.body for got in api.received] == [b"r" * 1000] * 2
