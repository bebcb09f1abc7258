"""The pooled upstream client on its own, against a scripted HTTP/1.1 server on loopback:
keep-alive reuse, close-delimited and chunked bodies, HEAD, interim 1xx answers, a
connection that dies between requests, silence, and backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.upstream.connection import HIGH_WATER, READ_SIZE, UpstreamError, UpstreamTimeout
from proxy.upstream.pool import Limits, Pool, Refused

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


async def test_keep_alive_connection_carries_the_next_request(scripted: MakePool) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    pool, server = await scripted(script)
    assert [await fetch(pool) for _ in range(3)] == [b"ok"] * 3
    assert server.connections == 1
    assert pool.idle == 1


async def test_close_delimited_body_is_read_to_the_end_and_not_reused(scripted: MakePool) -> None:
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
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()

    pool, server = await scripted(script)
    with pytest.raises(UpstreamError) as failure:
        await fetch(pool)
    assert not failure.value.replayable


async def test_silence_beyond_the_read_timeout_fails_the_exchange(scripted: MakePool) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(5)

    pool, server = await scripted(script, read_timeout=0.2)
    with pytest.raises(UpstreamTimeout):
        await fetch(pool)


async def test_reading_pauses_while_the_consumer_is_slow(scripted: MakePool) -> None:
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
