"""The client's request body: read whole when it is small enough to be sent again (a
replay after a 401, a retry on a stale connection), or streamed up as it arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import hdrs, web

from ..policy import errors
from ..upstream.connection import Connection, UpstreamError

__all__ = ["Body", "BodyFailed", "read_body", "upload"]

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyFailed(Exception):
    """The body could not be read (too slow, cut short, an Expect we do not know): the
    client gets `response`."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


@dataclass(frozen=True, slots=True)
class Body:
    """`kept`: the whole body, which can be sent again; None when it streams. `framing`:
    the header line that frames it upstream. `read_ahead`: what was read of a streamed
    body before it turned out too large to keep, sent first."""

    kept: bytes | None
    framing: bytes
    read_ahead: bytes = b""


_EMPTY: Final = Body(b"", b"")
_EMPTY_WITH_LENGTH: Final = Body(b"", b"Content-Length: 0\r\n")


async def read_body(
    request: web.BaseRequest,
    replay_limit: int,
    body_timeout: float,
    no_stream_room: Callable[[], web.Response | None],
) -> Body:
    """The body, whole when it is at most `replay_limit` bytes, and its framing. A body
    declared larger will stream: `no_stream_room()` may refuse it first."""
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None and expect.lower() != "100-continue":
        raise BodyFailed(
            errors.refused(417, "expectation_failed", "only 'Expect: 100-continue' is understood")
        )
    length = request.content_length
    chunked = "chunked" in request.headers.get(hdrs.TRANSFER_ENCODING, "").lower()
    if length is None and not chunked:
        return _EMPTY
    if length == 0:
        return _EMPTY_WITH_LENGTH
    if length is not None and length > replay_limit:
        # A stream: refused before 100 Continue invites its body, and before it is read.
        refused = no_stream_room()
        if refused is not None:
            raise BodyFailed(refused)
    if expect is not None:
        # Answered here, not upstream: the client may send the body now.
        await request.writer.write(CONTINUE)
    if length is not None and length <= replay_limit:
        try:
            async with asyncio.timeout(body_timeout):
                body = await request.content.readexactly(length)
        except TimeoutError:
            raise BodyFailed(too_slow(body_timeout)) from None
        except asyncio.IncompleteReadError:
            raise BodyFailed(
                errors.bad_request_body(
                    400, "body_incomplete", "the request body ended before its Content-Length"
                )
            ) from None
        return Body(body, b"Content-Length: %d\r\n" % length)
    if length is not None:
        return Body(None, b"Content-Length: %d\r\n" % length)
    # Chunked, length unknown: kept whole (and replayable) if it ends within the limit;
    # otherwise what was read goes first, and the rest streams.
    read_ahead = bytearray()
    try:
        while len(read_ahead) <= replay_limit:
            async with asyncio.timeout(body_timeout):
                chunk = await request.content.readany()
            if not chunk:
                return Body(bytes(read_ahead), b"Content-Length: %d\r\n" % len(read_ahead))
            read_ahead += chunk
    except TimeoutError:
        raise BodyFailed(too_slow(body_timeout)) from None
    return Body(None, b"Transfer-Encoding: chunked\r\n", bytes(read_ahead))


async def upload(
    request: web.BaseRequest, connection: Connection, read_ahead: bytes, body_timeout: float
) -> None:
    """Stream the client's body to the API as it arrives, then mark the request sent."""
    content = request.content
    chunked = request.content_length is None
    try:
        while True:
            if read_ahead:
                chunk, read_ahead = read_ahead, b""
            else:
                try:
                    async with asyncio.timeout(body_timeout):
                        chunk = await content.readany()
                except TimeoutError:
                    raise BodyFailed(too_slow(body_timeout)) from None
                if not chunk:
                    break
            if chunked:
                await connection.send_body(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                await connection.send_body(chunk)
        if chunked:
            await connection.send_body(b"0\r\n\r\n")
        connection.body_sent()
    except (asyncio.CancelledError, UpstreamError):
        raise  # cancelled by the handler, or the connection failed: the handler knows
    except BaseException:
        # Too slow, or the client's connection broke mid-body: the API must not wait on.
        connection.abort(UpstreamError("the client's request body failed"))
        raise


def too_slow(body_timeout: float) -> web.Response:
    return errors.bad_request_body(
        408,
        "body_timeout",
        f"the request body made no progress for {body_timeout:g} s "
        "(server.body_timeout); send it faster, or raise the limit",
    )


def incomplete() -> web.Response:
    return errors.bad_request_body(
        400, "body_incomplete", "the request body ended before it was complete"
    )
