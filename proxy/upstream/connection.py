"""One keep-alive HTTP/1.1 connection to the API host: an asyncio BufferedProtocol driven by
httptools' C response parser, with one silence timer and flow control both ways.

A connection carries one exchange at a time (no pipelining). `send` writes a request head
(and a whole body, when there is one); `send_body`/`end_body` stream a body instead;
`response` waits for the response head; `read` yields body chunks, b"" at the end. Reading
from the API pauses while more than `HIGH_WATER` bytes wait for the client, and writing to
the API waits while the socket's buffer is full, so a slow peer on either side costs a
bounded amount of memory. aiohttp's own client is kept for token exchanges and WebSockets;
this one exists because it costs half as much CPU per request (see README, Benchmark).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final, cast

import httptools

__all__ = ["HIGH_WATER", "READ_SIZE", "Connection", "Response", "UpstreamError", "UpstreamTimeout"]

# Response bytes read ahead of a slow client before reading from the API pauses: one
# socket read. With the client socket's own buffer, a slow download costs about this much
# (measured: about 250 KiB of RSS per slow stream, against 700 KiB with uvloop's 256 KiB
# reads and a 256 KiB mark; bench/slow_clients.py).
HIGH_WATER: Final = 64 * 1024
LOW_WATER: Final = 16 * 1024
# The most one socket read takes from the API, into one buffer shared by every connection
# of the process: httptools copies what it keeps (status, headers, body chunks) before the
# next read can happen.
READ_SIZE: Final = 64 * 1024
_READ_BUFFER: Final = memoryview(bytearray(READ_SIZE))


class UpstreamError(Exception):
    """The exchange failed. `replayable` is True when the API saw nothing it answered: the
    connection died before any response byte, so an idempotent request may be sent again."""

    def __init__(self, reason: str, *, replayable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.replayable = replayable


class UpstreamTimeout(UpstreamError):
    """The API stayed silent for longer than the read timeout."""


class Response:
    """A response head: status, reason and raw headers, as the API sent them."""

    __slots__ = ("content_length", "headers", "reason", "status")

    def __init__(
        self, status: int, reason: str, headers: list[tuple[bytes, bytes]], length: int | None
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = length


class Connection(asyncio.BufferedProtocol):
    """A connection and the state of its current exchange."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        # Served an exchange before: a failure before any response byte may be a stale
        # keep-alive connection the API had already closed.
        self.reused = False
        self._reuse = True
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._begin_exchange(head_only=False)
        self._active = False

    # The exchange --------------------------------------------------------------------

    def _begin_exchange(self, *, head_only: bool) -> None:
        self._active = True
        self._head_only = head_only
        self._got_bytes = False
        self._interim = False
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._response: Response | None = None
        self._head: asyncio.Future[Response] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._body_ready: asyncio.Future[None] | None = None
        self._complete = False
        self._until_eof = False
        self._keep_alive = False
        self._error: UpstreamError | None = None
        self._awaiting_response = False

    def send(self, head: bytes, body: bytes = b"", *, head_only: bool = False) -> None:
        """Start an exchange: write the request head and, if given, its whole body. With
        `head_only` (a HEAD request), the response has no body whatever its headers say."""
        assert self._transport is not None and not self.closed
        self._begin_exchange(head_only=head_only)
        if body:
            self._transport.writelines((head, body))
        else:
            self._transport.write(head)

    async def send_body(self, chunk: bytes) -> None:
        """Write part of a streamed body, waiting while the API is not reading it."""
        if self._error is not None:
            raise self._error
        assert self._transport is not None
        self._transport.write(chunk)
        if self._write_paused:
            await self._drain()

    def body_sent(self) -> None:
        """The request is all sent: from now on the API's silence counts."""
        self._awaiting_response = True
        self._last_data = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_data + self._read_timeout, self._tick)

    def response(self) -> asyncio.Future[Response]:
        """The response head (interim 1xx responses are skipped), to await. A future, not
        a coroutine: one object and one frame fewer on every request."""
        head = self._loop.create_future()
        if self._response is not None:
            head.set_result(self._response)
        elif self._error is not None:
            head.set_exception(self._error)
        else:
            self._head = head
        return head

    async def read(self) -> bytes:
        """The next chunk of the response body; b"" once it is complete."""
        while not self._chunks:
            if self._complete:
                return b""  # whole, even if the API sent junk after it (then not reused)
            if self._error is not None:
                raise self._error
            self._body_ready = self._loop.create_future()
            await self._body_ready
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._reading_paused and self._buffered <= LOW_WATER:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
            self._last_data = self._loop.time()
        return chunk

    def body_if_complete(self) -> bytes | None:
        """The whole body when all of it has arrived (and reading is not paused); None
        otherwise, and then `read_all`."""
        if not self._complete or self._reading_paused or self._error is not None:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def read_all(self) -> bytes:
        """The whole remaining body (for small, known-length bodies)."""
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    @property
    def reusable(self) -> bool:
        """The exchange ended cleanly and the connection may carry another one."""
        return (
            self._complete
            and self._keep_alive
            and self._reuse
            and not self.closed
            and self._error is None
        )

    def forbid_reuse(self) -> None:
        """The API answered before the request body was all sent: the connection is out of
        step and must close after this exchange."""
        self._reuse = False

    def abort(self, error: UpstreamError) -> None:
        """Give up on the exchange (the client's side failed): wake whoever waits with
        `error` and drop the connection."""
        self._fail(error)
        self._abort()

    def finish(self) -> None:
        """The exchange is over (whether or not it completed)."""
        self._active = False
        self._awaiting_response = False
        self.reused = True
        if not self.reusable:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()
        self._cancel_timer()

    # asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._active = False

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        data = _READ_BUFFER[:nbytes]
        self._last_data = self._loop.time()
        self._got_bytes = True
        if not self._active or self._complete:
            # Bytes nobody asked for (between exchanges, or after a whole answer): the
            # connection is out of step with the API and can no longer be trusted.
            self._reuse = False
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            if isinstance(err.__context__, _HeadDone):
                # A HEAD response ends at its head; a fresh parser reads the next one.
                self._parser = httptools.HttpResponseParser(self)
                return
            if isinstance(err.__context__, _Unasked):
                return  # the answer is whole; what followed it is never relayed
            self._fail(UpstreamError("the API sent a response the proxy cannot read"))
            self._abort()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(UpstreamError("the API sent a malformed response"))
            self._abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self._active and not self._complete and self._error is None:
            if self._until_eof and exc is None:
                self._complete = True  # a close-delimited body ends here
                self._wake_body()
            else:
                self._fail(
                    UpstreamError(
                        "the API closed the connection"
                        + (" mid-response" if self._got_bytes else ""),
                        replayable=self.reused and not self._got_bytes,
                    )
                )
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # A second response in the same read, which no request asked for: stop here,
            # and never reuse a connection this far out of step.
            self._reuse = False
            raise _Unasked

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._response is None:
            self._headers.append((name, value))
        # Trailers (after a chunked body) are dropped, as aiohttp's server cannot send them.

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 100 or status == 101:
            # Not an answer a client could read (101: this client never asks to upgrade).
            raise _Unreadable
        if 100 <= status < 200:
            # Interim answers (100 Continue, 103 Early Hints) are not relayed: the proxy's
            # own server answers Expect: 100-continue itself.
            self._interim = True
            self._headers = []
            self._reason = b""
            return
        length: int | None = None
        chunked = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding":
                chunked = chunked or b"chunked" in value.lower()
        no_body = self._head_only or status in (204, 304)
        self._until_eof = not no_body and not chunked and length is None
        self._response = Response(
            status, self._reason.decode("latin-1"), self._headers, None if chunked else length
        )
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(self._response)
        if self._head_only:
            self._message_done()
            raise _HeadDone  # stops the parser: it would wait for a body that never comes

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._message_done()

    # internals -----------------------------------------------------------------------

    def _message_done(self) -> None:
        self._complete = True
        self._awaiting_response = False
        self._keep_alive = self._parser.should_keep_alive()
        self._wake_body()

    def _wake_body(self) -> None:
        ready = self._body_ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is not None:
            return
        self._error = error
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)
        ready = self._body_ready
        if ready is not None and not ready.done():
            ready.set_exception(error)

    def _abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        self._cancel_timer()

    async def _drain(self) -> None:
        self._drained = self._loop.create_future()
        try:
            async with asyncio.timeout(self._read_timeout):
                await self._drained
        except TimeoutError:
            error = UpstreamTimeout("the API stopped reading the request body")
            self._fail(error)
            self._abort()
            raise error from None
        finally:
            self._drained = None
        if self._error is not None:
            raise self._error

    def _tick(self) -> None:
        """The silence timer: one handle per connection, re-armed lazily (cheaper than
        rescheduling at every read)."""
        self._timer = None
        if not self._awaiting_response or self.closed:
            return
        now = self._loop.time()
        if self._reading_paused:
            # The client is slow, not the API: silence is ours.
            self._last_data = now
        deadline = self._last_data + self._read_timeout
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._tick)
            return
        self._fail(UpstreamTimeout(f"the API sent nothing for {self._read_timeout:g} s"))
        self._abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _HeadDone(Exception):
    """Raised from a callback to stop parsing after a HEAD response's head."""


class _Unasked(Exception):
    """Raised from a callback when a second response follows a complete one."""


class _Unreadable(Exception):
    """Raised from a callback for a status no client can be given."""
