"""What a response head may hold and how its body is framed: the limits on what the API
sends besides a body, counted while a head arrives, and the framing decision, by the
parser's own rule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

__all__ = ["HeadCount", "HeadLimits", "HeadTooLarge", "body_framing", "writable_reason"]

# What aiohttp's server refuses to write in a status line or header (it raises mid-answer).
_UNWRITABLE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """What the API may send besides a body (aiohttp's client allows lines of 8190 bytes).
    httptools keeps a line whole until it ends, re-copying it at every read, so without
    these an endless header costs unbounded memory and a core."""

    line: int = 8190  # the status line, each header line
    head: int = 64 * 1024  # a whole response head, interim 1xx heads included
    # Bytes of a chunked body that are not body (chunk extensions, trailers), in a row.
    trailers: int = 64 * 1024


class HeadTooLarge(Exception):
    """A response head, or a chunked body's extensions and trailers, past one of the
    HeadLimits; the message says which."""


class HeadCount:
    """The bytes of one exchange's response heads so far, and of the line being read."""

    __slots__ = ("line", "total")

    def __init__(self) -> None:
        self.line = 0
        self.total = 0

    def end(self, buffer: bytearray, start: int, end: int, limits: HeadLimits) -> int:
        """Where the head being read ends within buffer[start:end] (`end` if it goes on),
        counting its bytes and lines; raises HeadTooLarge."""
        found = buffer.find(b"\r\n\r\n", start, end)
        stop = end if found < 0 else found + 4
        if self.line + stop - start > limits.line:
            # Some line may be too long: look at each (only heads this large pay for it).
            stop = self._lines(buffer, start, end, limits.line)
        elif found >= 0:
            self.line = 0
        else:
            last = buffer.rfind(b"\n", start, end)
            self.line = end - last - 1 if last >= 0 else self.line + end - start
        self.total += stop - start
        if self.total > limits.head:
            raise HeadTooLarge(
                f"the API sent a response head over {limits.head} bytes "
                "(appcircle.max_response_head)"
            )
        return stop

    def _lines(self, buffer: bytearray, start: int, end: int, limit: int) -> int:
        position = start
        while position < end:
            newline = buffer.find(b"\n", position, end)
            stop = end if newline < 0 else newline + 1
            self.line += stop - position
            if self.line - 2 > limit:  # the line's CRLF is not counted
                raise HeadTooLarge(
                    f"the API sent a response line over {limit} bytes (appcircle.max_response_line)"
                )
            if newline < 0:
                return end
            blank = self.line <= 2
            self.line = 0
            position = stop
            if blank:
                return stop
        return end


def body_framing(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """The body's length (None: unknown) and whether it is chunked, by httptools' own rule
    (RFC 9112, section 6.3): with Transfer-Encoding, chunked only when chunked is the last
    coding ('chunked, identity' and 'xchunked' are read until the connection closes) and
    any Content-Length ignored (httptools refuses the pair anyway); else Content-Length."""
    codings: list[bytes] = []
    length: int | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            codings.extend(value.split(b","))
        elif lowered == b"content-length":
            length = int(value)
    if codings:
        return None, codings[-1].strip().lower() == b"chunked"
    return length, False


def writable_reason(status: int, reason: bytes) -> bytes:
    """The reason phrase as the API sent it, unless no client could be sent it (a control
    byte): then the standard one, since the status says all a reason phrase may say."""
    if _UNWRITABLE.search(reason) is None:
        return reason
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
