"""One keep-alive HTTP/1.1 connection to the API host: an asyncio BufferedProtocol driven by
httptools' C response parser, with one silence timer and flow control both ways.

A connection carries one exchange at a time (no pipelining), and everything that belongs to
that exchange lives in one `_Exchange` object whose `phase` says where it stands; between
exchanges there is none. `send` writes a request head (and a whole body, when there is one);
`send_body`/`body_sent` stream a body instead; `response` waits for the response head; `read`
yields body chunks, b"" at the end. Reading from the API pauses while more than `HIGH_WATER`
bytes wait for the client, and writing to the API waits while the socket's buffer is full,
so a slow peer on either side costs a bounded amount of memory. aiohttp's own client is kept
for token exchanges and WebSockets; this one exists because it costs half as much CPU per
request (see README, Benchmark).
"""

from __future__ import annotations

import asyncio
import collections
import enum
from typing import Final, cast

import httptools

from .framing import HeadCount, HeadLimits, HeadTooLarge, body_framing, writable_reason

__all__ = [
    "HIGH_WATER",
    "READ_SIZE",
    "Connection",
    "Phase",
    "Response",
    "UpstreamBadResponse",
    "UpstreamError",
    "UpstreamTimeout",
]

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
_READ_BYTES: Final = bytearray(READ_SIZE)
_READ_BUFFER: Final = memoryview(_READ_BYTES)


class UpstreamError(Exception):
    """The exchange failed. `replayable` is True when the API saw nothing it answered: the
    connection died before any response byte, so an idempotent request may be sent again."""

    def __init__(self, reason: str, *, replayable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.replayable = replayable


class UpstreamTimeout(UpstreamError):
    """The API stayed silent for longer than the read timeout."""


class UpstreamBadResponse(UpstreamError):
    """The API sent a response the proxy will not relay: malformed, or past a size limit."""


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


class Phase(enum.Enum):
    """Where an exchange stands. The order is the only way forward; FAILED ends any phase
    but COMPLETE (an answer that arrived whole stays whole)."""

    SENDING = "sending"  # the request is going out; the answer may come before it is all sent
    WAITING = "waiting"  # all sent: the API's silence counts
    BODY = "body"  # the response head is in; its body is arriving
    COMPLETE = "complete"  # the whole answer arrived
    FAILED = "failed"


class _Exchange:
    """One request and its answer: all the state that starts afresh with each request."""

    __slots__ = (
        "body_ready",
        "buffered",
        "chunks",
        "error",
        "head_only",
        "head",
        "headers",
        "interim",
        "keep",
        "nonbody",
        "parts",
        "phase",
        "reason",
        "received",
        "response",
        "until_eof",
        "waiter",
    )

    def __init__(self, head_only: bool) -> None:
        self.phase = Phase.SENDING
        # A HEAD request: the answer has no body, whatever its headers say.
        self.head_only = head_only
        self.received = 0  # response bytes, of any kind
        self.head = HeadCount()  # of the response heads so far
        self.nonbody = 0  # bytes of a chunked body since its last body bytes
        self.interim = False  # inside a 1xx answer, which is skipped
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.response: Response | None = None
        self.waiter: asyncio.Future[Response] | None = None
        # Body bytes waiting for the reader; `parts` gathers those of one socket read.
        self.chunks: collections.deque[bytes] = collections.deque()
        self.parts: list[bytes] = []
        self.buffered = 0
        self.body_ready: asyncio.Future[None] | None = None
        self.until_eof = False  # a close-delimited body: the end of the connection ends it
        # May the connection carry another exchange after this one (the API's keep-alive,
        # and the exchange stayed in step with it).
        self.keep = True
        self.error: UpstreamError | None = None


class Connection(asyncio.BufferedProtocol):
    """A connection, its transport-level state, and its current exchange (None between
    exchanges: the connection is idle)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float,
        limits: HeadLimits = HeadLimits(),  # noqa: B008 (frozen, shared)
    ) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        # Exchanges carried to their end: a failure before any response byte on a connection
        # that served one may be a stale keep-alive the API had already closed.
        self._served = 0
        self._exchange: _Exchange | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0

    @property
    def reused(self) -> bool:
        return self._served > 0

    @property
    def phase(self) -> Phase | None:
        """The current exchange's phase; None when the connection is idle."""
        return None if self._exchange is None else self._exchange.phase

    # The exchange --------------------------------------------------------------------

    def send(self, head: bytes, body: bytes = b"", *, head_only: bool = False) -> None:
        """Start an exchange: write the request head and, if given, its whole body. With
        `head_only` (a HEAD request), the response has no body whatever its headers say."""
        assert self._transport is not None and not self.closed
        self._exchange = _Exchange(head_only)
        if self._reading_paused:
            # The last exchange ended with unread bytes: reading starts again.
            self._reading_paused = False
            self._transport.resume_reading()
        if body:
            self._transport.writelines((head, body))
        else:
            self._transport.write(head)

    async def send_body(self, chunk: bytes) -> None:
        """Write part of a streamed body, waiting while the API is not reading it."""
        exchange = self._current()
        if exchange.error is not None:
            raise exchange.error
        assert self._transport is not None
        self._transport.write(chunk)
        if self._write_paused:
            await self._drain()

    def body_sent(self) -> None:
        """The request is all sent: from now on the API's silence counts (and counted
        already if the answer came first)."""
        exchange = self._current()
        if exchange.phase is Phase.SENDING:
            exchange.phase = Phase.WAITING
        self._last_data = self._loop.time()
        self._arm_timer()

    def response(self) -> asyncio.Future[Response]:
        """The response head (interim 1xx responses are skipped), to await. A future, not
        a coroutine: one object and one frame fewer on every request."""
        exchange = self._current()
        head = self._loop.create_future()
        if exchange.response is not None:
            head.set_result(exchange.response)
        elif exchange.error is not None:
            head.set_exception(exchange.error)
        else:
            exchange.waiter = head
        return head

    async def read(self) -> bytes:
        """The next chunk of the response body; b"" once it is complete."""
        exchange = self._current()
        while not exchange.chunks:
            if exchange.phase is Phase.COMPLETE:
                return b""  # whole, even if the API sent junk after it (then not reused)
            if exchange.error is not None:
                raise exchange.error
            exchange.body_ready = self._loop.create_future()
            await exchange.body_ready
        chunk = exchange.chunks.popleft()
        exchange.buffered -= len(chunk)
        if self._reading_paused and exchange.buffered <= LOW_WATER:
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
            self._last_data = self._loop.time()
        return chunk

    def body_if_complete(self) -> bytes | None:
        """The whole body when all of it has arrived (and reading is not paused); None
        otherwise, and then `read_all`."""
        exchange = self._current()
        if exchange.phase is not Phase.COMPLETE or self._reading_paused:
            return None
        body = b"".join(exchange.chunks)
        exchange.chunks.clear()
        exchange.buffered = 0
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
        exchange = self._exchange
        return (
            exchange is not None
            and exchange.phase is Phase.COMPLETE
            and exchange.keep
            and not self.closed
        )

    def forbid_reuse(self) -> None:
        """The API answered before the request body was all sent: the connection is out of
        step and must close after this exchange."""
        self._current().keep = False

    def abort(self, error: UpstreamError) -> None:
        """Give up on the exchange (the client's side failed): wake whoever waits with
        `error` and drop the connection."""
        self._fail(error)
        self._abort()

    def finish(self) -> None:
        """The exchange is over (whether or not it completed): the connection is idle, or
        closed when it cannot carry another."""
        if self._exchange is None:
            return
        reusable = self.reusable
        self._exchange = None
        self._served += 1
        if not reusable:
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

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self._last_data = self._loop.time()
        exchange = self._exchange
        if exchange is None or exchange.phase in (Phase.COMPLETE, Phase.FAILED):
            # Bytes nobody asked for (between exchanges, or after a whole answer): the
            # connection is out of step with the API and can no longer be trusted.
            if exchange is not None:
                exchange.keep = False
            self.close()
            return
        exchange.received += nbytes
        start = 0
        end = nbytes
        try:
            while start < nbytes and exchange.response is None:
                # A head is fed up to its end, then the body on its own: a head's lines are
                # counted as they arrive, a body's never are.
                end = exchange.head.end(_READ_BYTES, start, nbytes, self._limits)
                self._parser.feed_data(_READ_BUFFER[start:end])
                start = end
            if start < nbytes:
                if self.phase is Phase.COMPLETE:
                    # After a whole answer (a HEAD's head, or a body of known length
                    # ended): bytes nobody asked for, never relayed.
                    exchange.keep = False
                    return
                self._parser.feed_data(_READ_BUFFER[start:nbytes])
                self._count_nonbody(exchange, nbytes - start)
        except httptools.HttpParserCallbackError as err:
            cause = err.__context__
            if isinstance(cause, _HeadDone):
                # A HEAD response ends at its head; a fresh parser reads the next one.
                self._parser = httptools.HttpResponseParser(self)
                if end < nbytes:
                    exchange.keep = False  # bytes after it that nobody asked for
                return
            if isinstance(cause, _Unasked):
                return  # the answer is whole; what followed it is never relayed
            if isinstance(cause, UpstreamBadResponse):
                self._fail(cause)
            else:
                self._fail(UpstreamBadResponse("the API sent a response the proxy cannot read"))
            self._abort()
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(UpstreamBadResponse("the API sent a malformed response"))
            self._abort()
        except HeadTooLarge as error:
            self._fail(UpstreamBadResponse(str(error)))
            self._abort()
        finally:
            parts = exchange.parts
            if parts:
                # Bytes that arrived together leave together: one chunk per socket read,
                # however many chunks of the API's framing it held.
                self._deliver(exchange, parts[0] if len(parts) == 1 else b"".join(parts))
                parts.clear()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        exchange = self._exchange
        if exchange is not None and exchange.phase not in (Phase.COMPLETE, Phase.FAILED):
            if exchange.until_eof and exc is None:
                self._message_done(exchange)  # a close-delimited body ends here
            else:
                self._fail(
                    UpstreamError(
                        "the API closed the connection"
                        + (" mid-response" if exchange.received else ""),
                        replayable=self.reused and not exchange.received,
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
        exchange = self._current()
        if exchange.phase is Phase.COMPLETE:
            # A second response in the same read, which no request asked for: stop here,
            # and never reuse a connection this far out of step.
            exchange.keep = False
            raise _Unasked

    def on_status(self, reason: bytes) -> None:
        self._current().reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self._current()
        if exchange.response is None:
            exchange.headers.append((name, value))
        # Trailers (after a chunked body) are dropped, as aiohttp's server cannot send them.

    def on_headers_complete(self) -> None:
        exchange = self._current()
        status = self._parser.get_status_code()
        if status < 100 or status == 101:
            # Not an answer a client could read (101: this client never asks to upgrade).
            raise _Unreadable
        if 100 <= status < 200:
            # Interim answers (100 Continue, 103 Early Hints) are not relayed: the proxy's
            # own server answers Expect: 100-continue itself.
            exchange.interim = True
            exchange.headers = []
            exchange.reason = b""
            return
        length, chunked = body_framing(exchange.headers)
        no_body = exchange.head_only or status in (204, 304)
        exchange.until_eof = not no_body and not chunked and length is None
        reason = writable_reason(status, exchange.reason).decode("latin-1")
        response = Response(status, reason, exchange.headers, length)
        exchange.response = response
        exchange.phase = Phase.BODY
        # Counts from here even when the answer came before the request was all sent.
        self._arm_timer()
        waiter, exchange.waiter = exchange.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if exchange.head_only:
            self._message_done(exchange)
            raise _HeadDone  # stops the parser: it would wait for a body that never comes

    def on_body(self, body: bytes) -> None:
        self._current().parts.append(body)

    def on_message_complete(self) -> None:
        exchange = self._current()
        if exchange.interim:
            exchange.interim = False
            return
        self._message_done(exchange)

    # internals -----------------------------------------------------------------------

    def _current(self) -> _Exchange:
        exchange = self._exchange
        assert exchange is not None, "no exchange on this connection"
        return exchange

    def _count_nonbody(self, exchange: _Exchange, fed: int) -> None:
        """Bound what a chunked body sends besides body (extensions, trailers): httptools
        keeps a trailer whole, and an endless extension would hold the exchange for ever."""
        delivered = sum(map(len, exchange.parts))
        if delivered == fed:
            return
        exchange.nonbody = 0 if delivered else exchange.nonbody + fed
        if exchange.nonbody > self._limits.trailers:
            raise HeadTooLarge(
                f"the API sent over {self._limits.trailers} bytes of chunk extensions or "
                "trailers (appcircle.max_response_trailers)"
            )

    def _deliver(self, exchange: _Exchange, body: bytes) -> None:
        exchange.chunks.append(body)
        exchange.buffered += len(body)
        if exchange.buffered > HIGH_WATER and not self._reading_paused and not self.closed:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake_body(exchange)

    def _message_done(self, exchange: _Exchange) -> None:
        exchange.phase = Phase.COMPLETE
        exchange.keep = exchange.keep and self._parser.should_keep_alive()
        self._wake_body(exchange)

    @staticmethod
    def _wake_body(exchange: _Exchange) -> None:
        ready = exchange.body_ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        exchange = self._exchange
        if exchange is None or exchange.error is not None:
            return
        if exchange.phase is Phase.COMPLETE:
            exchange.keep = False  # the answer is whole; the connection is not to be trusted
            return
        exchange.error = error
        exchange.phase = Phase.FAILED
        waiter, exchange.waiter = exchange.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        ready = exchange.body_ready
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
        exchange = self._current()
        if exchange.error is not None:
            raise exchange.error

    def _arm_timer(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_data + self._read_timeout, self._tick)

    def _tick(self) -> None:
        """The silence timer: one handle per connection, re-armed lazily (cheaper than
        rescheduling at every read)."""
        self._timer = None
        exchange = self._exchange
        if exchange is None or exchange.phase not in (Phase.WAITING, Phase.BODY):
            return
        if self.closed:
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
