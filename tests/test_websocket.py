"""WebSocket upgrades: the handshake with the token, messages both ways, closes and
their codes passed on, and every way a side can go away."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.support.standin import StandIn

from .conftest import StartProxy
from .support import assert_no_tracebacks, errors_logged, eventually, gauges, request
from .support.rawapi import HeadAnswer, RawApi
from .support.rawclient import exchange, status_of


async def raw_get(proxy: str, head: bytes) -> bytes:
    """GET / with the given header lines (CRLF-terminated), answered within half a second."""
    return await exchange(proxy, b"GET /x HTTP/1.1\r\n" + head + b"\r\n", read_for=0.5)


KEY = base64.b64encode(b"0123456789abcdef")


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


STREAMS = 'appcircle_proxy_upstream_connections{state="streams"}'


def frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with a zero key (so the payload goes as it is)."""
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + b"\0\0\0\0" + payload


async def raw_websocket(
    proxy: str, path: str, *, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket handshake by hand, for clients that misbehave; returns once upgraded."""
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET %s HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n" % (path.encode(), key)
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def _streams_idle(http: aiohttp.ClientSession, proxy: str) -> bool:
    return (await gauges(http, proxy))[STREAMS] == 0


@pytest.mark.parametrize(
    "handshake",
    [
        b"Sec-WebSocket-Version: 13\r\n",
        b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: " + KEY + b"\r\n",
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n",
    ],
    ids=["no-key", "bad-version", "bad-key"],
)
async def test_malformed_websocket_upgrade_is_400_before_anything_opens_upstream(
    handshake: bytes,
    start_proxy: StartProxy,
    standin: StandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A WebSocket upgrade with no key, a version other than 13 or a malformed key is refused 400
    bad_websocket_upgrade before any token exchange or upstream connection, with no traceback."""
    proxy = await start_proxy()
    answer = await raw_get(
        proxy, b"Host: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + handshake
    )
    assert status_of(answer) == 400 and b"bad_websocket_upgrade" in answer
    assert standin.api_requests == [] and standin.exchanges == []
    assert_no_tracebacks(caplog)


async def test_websocket_handshake_never_follows_a_redirect(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A redirect answered to a WebSocket handshake is not followed: the client gets 502 and the API
    sees only the first request."""
    proxy = await start_proxy()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{proxy}/_test/redirect", params={"to": "/_test/ws"})
    assert refused.value.status == 502
    assert [seen.raw_path for seen in standin.api_requests] == ["/_test/redirect?to=/_test/ws"]


async def test_a_websocket_close_without_a_code_reaches_the_api_as_a_close(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """A client WebSocket close frame with no code reaches the API as a normal close (1000 or 1005),
    not as the invalid code 0 the API would read as a protocol error."""
    # A close frame may carry no code (RFC 6455 5.5.1; aiohttp reads it as code 0). The
    # proxy relays it as close(code=0), a code no endpoint may send, so the API sees a
    # protocol error instead of the client's close.
    proxy = await start_proxy()
    reader, writer = await raw_websocket(proxy, "/_test/ws")
    try:
        writer.write(frame(WSMsgType.CLOSE, b""))
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)  # the proxy's close, then EOF
    finally:
        writer.close()
    await eventually(lambda: bool(standin.websocket_closes), within=2)
    assert standin.websocket_closes[0] in (1000, 1005)


async def test_a_websocket_client_that_stops_reading_gives_its_stream_back_after_send_timeout(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A WebSocket client that stops reading the API's messages is cut off after
    server.send_timeout, so its stream slot and upstream connection are given back."""
    # The API echoes 8 MiB the client never reads: the relay's send to the client waits
    # for the socket to drain with no deadline, holding a stream slot (and the upstream
    # connection) for as long as the client keeps its socket open.
    proxy = await start_proxy(server={"send_timeout": 0.3})
    reader, writer = await raw_websocket(proxy, "/_test/ws", receive_buffer=4096)
    try:
        chunk = frame(WSMsgType.BINARY, b"x" * 65536)
        for _ in range(128):
            writer.write(chunk)
        await writer.drain()
        assert (await gauges(http, proxy))[STREAMS] == 1
        await eventually(lambda: _streams_idle(http, proxy), within=3)
    finally:
        writer.close()


async def test_a_websocket_client_gone_while_the_relay_writes_to_it_logs_no_traceback(
    start_proxy: StartProxy, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A WebSocket client that hangs up while the relay is blocked writing to it frees its stream
    and leaves no error or traceback in the log."""
    # The relay is blocked sending the API's echo to a client that reads nothing; the
    # client then hangs up. The send raises ConnectionError, which _pump does not expect,
    # and aiohttp logs "Error handling request" with a traceback.
    proxy = await start_proxy()
    reader, writer = await raw_websocket(proxy, "/_test/ws", receive_buffer=4096)
    chunk = frame(WSMsgType.BINARY, b"x" * 65536)
    for _ in range(128):
        writer.write(chunk)
    await writer.drain()
    writer.close()
    await eventually(lambda: _streams_idle(http, proxy), within=3)
    assert errors_logged(caplog) == []


async def test_an_api_websocket_that_drops_without_a_close_is_not_a_normal_close_for_the_client(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
    http: aiohttp.ClientSession,
) -> None:
    """When the API's WebSocket connection drops without a close frame, the client is closed with a
    code other than 1000, so it can tell a lost session from a finished one."""

    # The API accepts the upgrade, then its connection is gone with no close frame. The
    # relay's upstream receive() gives CLOSED, _pump returns quietly, and the client is
    # closed with 1000 (normal closure): it cannot tell a finished session from a lost one.
    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    api = await scripted_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    async with http.ws_connect(f"{proxy}/socket") as socket_:
        message = await asyncio.wait_for(socket_.receive(), 5)
    assert message.type is WSMsgType.CLOSE
    assert message.data != 1000, "a lost API connection was reported as a normal close"


async def test_a_websocket_handshake_the_api_never_answers_times_out(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
    http: aiohttp.ClientSession,
) -> None:
    """A WebSocket upgrade the API never answers fails with 504 after appcircle.read_timeout and
    gives its stream slot back, instead of holding the client forever."""

    # The upstream handshake runs on a session with only sock_connect set (total=None, no
    # sock_read): an API that takes the upgrade request and says nothing holds the client
    # and a stream slot forever, whatever appcircle.read_timeout says.
    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await asyncio.sleep(3600)

    api = await scripted_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url, "read_timeout": 0.3})
    try:
        async with asyncio.timeout(3):
            await http.ws_connect(f"{proxy}/socket")
    except aiohttp.WSServerHandshakeError as refused:
        assert refused.status == 504
    else:
        raise AssertionError("the handshake was relayed")
    assert (await gauges(http, proxy))[STREAMS] == 0


async def test_websocket_is_relayed_both_ways_with_the_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A WebSocket is relayed both ways with its subprotocol, text and binary messages and the
    client's close code (4001), after the upgrade passed the API's token check."""
    proxy = await start_proxy()
    async with http.ws_connect(f"{proxy}/_test/ws", protocols=("appcircle.v1",)) as socket_:
        assert socket_.protocol == "appcircle.v1"
        await socket_.send_str("hello")
        assert await socket_.receive_str() == "echo: hello"
        await socket_.send_bytes(b"\x01\x02\x03")
        assert await socket_.receive_bytes() == b"\x03\x02\x01"
        await socket_.close(code=4001, message=b"client done")
    await eventually(lambda: standin.websocket_closes == [4001])
    assert standin.api_requests[-1].raw_path == "/_test/ws"  # it passed the token check


async def test_websocket_closed_by_the_api_closes_the_client_with_its_code(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A WebSocket the API closes reaches the client as a close with the API's code and reason
    (4000, "bye")."""
    proxy = await start_proxy()
    async with http.ws_connect(f"{proxy}/_test/ws") as socket_:
        await socket_.send_str("close-me")
        message = await asyncio.wait_for(socket_.receive(), 5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (4000, "bye")


async def test_websocket_handshake_refused_with_401_renews_the_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A WebSocket handshake the API refuses with 401 (token revoked) renews the token and succeeds,
    with exactly one extra exchange."""
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    standin.revoke_all()
    async with http.ws_connect(f"{proxy}/_test/ws") as socket_:
        await socket_.send_str("again")
        assert await socket_.receive_str() == "echo: again"
    assert len(standin.exchanges) == 2
