"""What a client connection may cost before any request check runs: a cap on open
connections (the excess gets an immediate 503), and a bound on the request head counted
while it is read (an oversized head gets 431, or the connection is closed), so memory does
not grow with the number or the patience of hostile clients.

aiohttp's parser bounds the request line, each header and the number of headers, but not
their sum: a hundred 32 KiB headers are fine with it. The protocol here sits between the
transport and aiohttp's RequestHandler and counts the bytes of the head in progress.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast

from aiohttp import StreamReader, web

from .aiohttp_private import carries_frames, watch_requests

__all__ = ["Connections", "head_limit"]

# A refused client gets its answer, then this long to stop sending before the socket is
# closed (closing on unread data would reset the connection and lose the answer).
LINGER_SECONDS: Final = 0.5
# Beyond the URL and the headers: the method, the version, the line ends.
HEAD_SLACK: Final = 1024


def head_limit(max_url_length: int, max_header_bytes: int) -> int:
    """The most bytes a request head may take while it is read."""
    return max_url_length + max_header_bytes + HEAD_SLACK


def _answer(status: int, reason: str, error: str, detail: str) -> bytes:
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass(slots=True)
class Connections:
    """One listener's client connections: how many are open, and the bounds on them."""

    limit: int
    head_limit: int
    open: int = 0
    # Refused connections still lingering; beyond `limit` of them, they are cut at once.
    lingering: int = 0
    overloaded: bytes = field(init=False, repr=False)
    head_too_large: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.overloaded = _answer(
            503,
            "Service Unavailable",
            "too_many_connections",
            f"the proxy already has {self.limit} client connections open "
            "(server.max_client_connections); retry shortly, or reuse connections",
        )
        self.head_too_large = _answer(
            431,
            "Request Header Fields Too Large",
            "headers_too_large",
            f"the request head is larger than {self.head_limit} bytes; send fewer or "
            "smaller headers (server.max_header_bytes) and a shorter URL "
            "(server.max_url_length)",
        )

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for a listener in front of aiohttp's `server`."""

        def protocol() -> asyncio.Protocol:
            if self.open >= self.limit:
                return _Refused(self, self.overloaded)
            return _Bounded(self, server())

        return protocol


class _Refused(asyncio.Protocol):
    """Answers at once and reads nothing: the connection costs a socket for a moment."""

    def __init__(self, connections: Connections, answer: bytes) -> None:
        self._connections = connections
        self._answer = answer
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self._connections.lingering >= self._connections.limit:
            transport.abort()
            return
        self._lingering = True
        self._connections.lingering += 1
        transport.write(self._answer)
        _linger(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering:
            self._connections.lingering -= 1


def _linger(transport: asyncio.Transport) -> None:
    asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)


class _Bounded(asyncio.Protocol):
    """aiohttp's RequestHandler, with the bytes of each request head counted as they come.

    A head is in progress whenever the connection is not carrying a body or a WebSocket:
    counting starts after the last parsed request's body has ended and stops when the next
    request is parsed. Chunks that straddle that boundary may be counted short, by at most
    one read (256 KiB), never long. What aiohttp does not show publicly (when a request is
    parsed, whether frames flow) comes from `aiohttp_private`.
    """

    __slots__ = ("_connections", "_handler", "_transport", "_head", "_payload", "_parsed")

    def __init__(self, connections: Connections, handler: web.RequestHandler) -> None:
        self._connections = connections
        self._handler = handler
        self._transport: asyncio.Transport | None = None
        self._head = 0
        self._payload: StreamReader | None = None  # the last request's body
        self._parsed = 0  # requests parsed so far on this connection
        watch_requests(handler, self._request_parsed)

    def _request_parsed(self, payload: StreamReader) -> None:
        # Whichever aiohttp code path parsed it (data_received, or its own re-parse of
        # buffered bytes later): the head is done, and what follows is this body.
        self._payload = payload
        self._parsed += 1
        self._head = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connections.open += 1
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.open -= 1
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def eof_received(self) -> None:
        # aiohttp's handler ignores a half-close; the transport then closes the connection.
        self._handler.eof_received()

    def data_received(self, data: bytes) -> None:
        if self._transport is None:  # refused: read on and drop, until the linger ends
            return
        handler = self._handler
        # A declined upgrade counts heads again.
        if carries_frames(handler):
            handler.data_received(data)
            return
        in_body = self._payload is not None and not self._payload.is_eof()
        parsed = self._parsed
        handler.data_received(data)
        if self._parsed != parsed or in_body:
            return
        self._head += len(data)
        if self._head > self._connections.head_limit:
            self._refuse_head()

    def _refuse_head(self) -> None:
        transport, self._transport = self._transport, None
        assert transport is not None
        # On the connection's first request nothing else is answering: say why. After
        # that, an answer may be under way, and the connection is just closed.
        if self._payload is None:
            transport.write(self._connections.head_too_large)
        _linger(transport)
