"""WebSocket upgrades: the handshake goes to the API host with the session token, then
messages are relayed both ways until either side closes, and the close (code and reason)
is passed on to the other side.

A malformed handshake is refused before anything is opened upstream, and the upstream
handshake never follows a redirect: the token goes to the configured API and nowhere else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from ..auth.tokens import TokenUnavailable
from ..policy import errors
from ..policy.routes import Route
from .failures import upstream_failed

__all__ = ["Session", "is_upgrade", "relay"]

log = logging.getLogger("appcircle_proxy.websocket")

# The handshake's own headers: aiohttp makes fresh ones for the upstream handshake.
HANDSHAKE_HEADERS: Final = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
)
INTERNAL_ERROR: Final = 1011
NORMAL_CLOSURE: Final = 1000
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})

WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
# aiohttp's client carries WebSockets (the pooled client is for plain HTTP).
Session = aiohttp.ClientSession


def is_upgrade(request: web.BaseRequest) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def relay(
    request: web.BaseRequest,
    session: Session,
    route: Route,
    target: URL,
    headers: CIMultiDict[str],
    decorate: Callable[[CIMultiDict[str]], None],
    send_timeout: float,
) -> web.StreamResponse:
    # aiohttp also takes the draft versions 7 and 8; the upstream handshake is 13.
    if (
        request.headers.get("Sec-WebSocket-Version") != "13"
        or not web.WebSocketResponse().can_prepare(request).ok
    ):
        return errors.refused(
            400,
            "bad_websocket_upgrade",
            "the WebSocket handshake is malformed: a GET with Connection: Upgrade, "
            "Upgrade: websocket, Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key of 16 "
            "base64-encoded bytes is needed",
        )
    protocols = tuple(
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    )
    for name in HANDSHAKE_HEADERS:
        headers.popall(name, None)
    upstream = await _connect(session, route, target, headers, protocols)
    if isinstance(upstream, web.Response):
        return upstream
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=False
    )
    decorate(client.headers)
    try:
        await client.prepare(request)
        pumps = [
            asyncio.create_task(_pump(client, upstream, send_timeout)),
            asyncio.create_task(_pump(upstream, client, send_timeout)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for pump in pumps:
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
    finally:
        await upstream.close()
        await client.close()
    return client


async def _connect(
    session: aiohttp.ClientSession,
    route: Route,
    target: URL,
    headers: CIMultiDict[str],
    protocols: tuple[str, ...],
) -> aiohttp.ClientWebSocketResponse | web.Response:
    """The upstream half, or the error answer; a 401 renews the token and retries once."""
    # ws_connect always follows redirects; a session of its own, on the same pool, whose
    # middleware stops at the first one.
    handshakes = aiohttp.ClientSession(
        connector=session.connector,
        connector_owner=False,
        timeout=session.timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=session.trust_env,  # the egress proxy (HTTPS_PROXY...), if any
        middlewares=(_no_redirects,),
    )
    async with handshakes:
        return await _handshake(handshakes, route, target, headers, protocols)


async def _no_redirects(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    response = await handler(request)
    if response.status in REDIRECTS:
        response.close()
        raise aiohttp.WSServerHandshakeError(
            response.request_info, response.history, status=response.status
        )
    return response


async def _handshake(
    session: aiohttp.ClientSession,
    route: Route,
    target: URL,
    headers: CIMultiDict[str],
    protocols: tuple[str, ...],
) -> aiohttp.ClientWebSocketResponse | web.Response:
    for attempt in (1, 2):
        try:
            token = await route.tokens.get()
        except TokenUnavailable as problem:
            return errors.token_unavailable(route, problem)
        headers["Authorization"] = f"Bearer {token.value}"
        try:
            return await session.ws_connect(
                target, headers=headers, protocols=protocols, autoclose=False
            )
        except aiohttp.WSServerHandshakeError as err:
            # Again only with another token: renewals after a 401 are rate-limited.
            if err.status == 401 and route.tokens.invalidate(token) and attempt == 1:
                continue
            return errors.upstream_refused_websocket(err.status)
        except (TimeoutError, aiohttp.ClientError) as err:
            return upstream_failed(str(target.origin()), err)
    raise AssertionError("unreachable")


async def _pump(source: WebSocket, sink: WebSocket, send_timeout: float) -> None:
    """Relay messages from source to sink. A close from source closes sink alike; an end
    without a close (a dropped connection) closes it with 1011, so the other side can tell it
    from a finished session; a sink that takes nothing for `send_timeout` ends the relay,
    which would otherwise hold its stream slot for ever."""
    while True:
        message = await source.receive()
        try:
            async with asyncio.timeout(send_timeout):
                if message.type is WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif message.type is WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
                elif message.type is WSMsgType.CLOSE:
                    # A close with no code (RFC 6455 allows it) reads as 0, which is not one.
                    code = message.data or NORMAL_CLOSURE
                    await sink.close(code=code, message=(message.extra or "").encode())
                    return
                elif message.type is WSMsgType.ERROR:
                    log.info("websocket relay ended by an error: %s", type(message.data).__name__)
                    await sink.close(code=INTERNAL_ERROR)
                    return
                elif message.type is WSMsgType.CLOSED:
                    await sink.close(code=INTERNAL_ERROR)
                    return
                elif message.type is WSMsgType.CLOSING:
                    return
        except TimeoutError:
            log.info(
                "websocket relay: one side took nothing for %g s (server.send_timeout); ending it",
                send_timeout,
            )
            return
        except ConnectionError:
            log.info("websocket relay: one side went away mid-message")
            return
