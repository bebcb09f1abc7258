"""Second red-team pass, each finding a failing test over real sockets: WebSocket relay,
inbound limits and drain, userinfo and allow rules, the client token, `run` and `wait`."""

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
from aiohttp import ClientSession, WSMsgType, web
from yarl import URL

from proxy.serve.userinfo import USERINFO_PATH
from tests.standin import StandIn

from . import test_redteam
from .conftest import StartProxy
from .rawhttp import exchange, status_of
from .support import eventually, request
from .test_redteam import Answer, ScriptedApi, errors_logged, gauges

# The scripted API of the first pass, as a fixture here too.
scripted_api = test_redteam.scripted_api

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


async def _streams_idle(http: aiohttp.ClientSession, proxy: str) -> bool:
    return (await gauges(http, proxy))[STREAMS] == 0


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


CI_ROUTE = {
    "ci": {
        "prefix": "/ci",
        "credential": "main",
        "allow": ["POST /distribution/v2/profiles/*/app-versions"],
    }
}


async def test_a_fragment_in_the_target_cannot_carry_a_request_past_an_allow_rule(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """A '#' in the request target cannot make a path match a route's allow rule: the request is
    refused with 400 or 403 and never reaches an endpoint the rule does not allow."""
    # The rule allows POST .../profiles/{id}/app-versions only. '#' is matched as part of
    # a segment ('p1#' fits '*'), the target goes upstream as sent, and the API, which
    # drops the fragment, reads a POST to /distribution/v2/profiles/p1: an endpoint the
    # rule does not allow.
    proxy = await start_proxy(routes=CI_ROUTE)
    answer = await exchange(
        proxy,
        b"POST /ci/distribution/v2/profiles/p1#/app-versions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    reached = [URL(seen.raw_path).path for seen in standin.api_requests]
    assert reached == [], f"the API served POST {reached}"
    assert status_of(answer) in (400, 403)


async def test_an_api_websocket_that_drops_without_a_close_is_not_a_normal_close_for_the_client(
    start_proxy: StartProxy,
    scripted_api: Callable[[Answer], Awaitable[ScriptedApi]],
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


async def test_userinfo_requests_are_bounded_like_api_calls(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Userinfo requests are admitted through the same pool as API calls: no more than
    appcircle.max_connections of them reach the auth host at once, the rest get 503."""
    # The userinfo relay runs on the WebSocket session (connector limit=0) and never asks
    # the pool for admission: any number of clients open as many connections to the auth
    # host at once, past max_connections and max_pending.
    in_flight = most = 0

    async def exchange_token(request: web.Request) -> web.Response:
        async with ClientSession() as session:
            async with session.post(
                standin.auth_url + request.path,
                data=await request.read(),
                headers={"Content-Type": request.content_type},
            ) as reply:
                return web.Response(
                    status=reply.status, body=await reply.read(), content_type="application/json"
                )

    async def slow_userinfo(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.3)
        finally:
            in_flight -= 1
        return web.json_response({"sub": "someone"})

    app = web.Application()
    app.router.add_post("/auth/v3/token", exchange_token)
    app.router.add_get(USERINFO_PATH, slow_userinfo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        proxy = await start_proxy(
            appcircle={
                "auth_url": f"http://127.0.0.1:{port}",
                "max_connections": 2,
                "max_streams": 2,
            },
            server={"max_pending": 0},
        )
        replies = await asyncio.gather(
            *(request(http, "GET", proxy + USERINFO_PATH) for _ in range(12))
        )
        assert {reply.status for reply in replies} <= {200, 503}
        assert most <= 2, f"{most} userinfo requests reached the auth host at once"
    finally:
        await runner.cleanup()


async def test_a_websocket_handshake_the_api_never_answers_times_out(
    start_proxy: StartProxy,
    scripted_api: Callable[[Answer], Awaitable[ScriptedApi]],
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
