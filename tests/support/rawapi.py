"""A scripted raw HTTP/1.1 API on loopback, for answers no real server would send: it reads
each request (head, and body by Content-Length or chunked) and lets `answer` write any
bytes, or close without a word. Records every request it read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Received:
    """A request as the API read it; `connection` numbers the connection it came on."""

    head: bytes
    body: bytes
    connection: int

    @property
    def method(self) -> str:
        return self.head.split(b" ", 1)[0].decode()

    @property
    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode()


# Answer a request on the writer (or close it: the API then reads no more on it).
Answer = Callable[[Received, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# An answer that needs only the request head (as the red-team tests write them).
HeadAnswer = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawApi:
    """With `read_body` False, `answer` is called once the head is read and reads the body
    itself, if at all (Received.body is then empty)."""

    def __init__(self, answer: Answer, *, read_body: bool = True) -> None:
        self.answer = answer
        self.read_body = read_body
        self.received: list[Received] = []
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    @property
    def heads(self) -> list[bytes]:
        return [received.head for received in self.received]

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port, limit=1 << 20)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while not writer.is_closing():
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _body(head, reader) if self.read_body else b""
                received = Received(head, body, number)
                self.received.append(received)
                await self.answer(received, reader, writer)
                if not writer.is_closing():
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


async def _body(head: bytes, reader: asyncio.StreamReader) -> bytes:
    lines = head.lower().split(b"\r\n")
    if b"transfer-encoding: chunked" in lines:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # no trailers from the proxy
        return b"".join(parts)
    for line in lines:
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


# What the `raw_api` fixture (conftest) gives a test: start one with this answer.
MakeApi = Callable[[Answer], Awaitable["RawApi"]]


def chunked_forever(
    interval: float,
) -> HeadAnswer:
    """An answer that streams a chunked body for as long as the connection lasts."""

    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if _path(head).startswith(b"/stream"):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while True:
                writer.write(b"%x\r\n%s\r\n" % (65536, b"s" * 65536))
                await writer.drain()
                await asyncio.sleep(interval)
        elif _path(head).startswith(b"/create"):
            # A JSON answer of unknown length, as many APIs send (chunked).
            writer.write(
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
                b'e\r\n{"id": "new1"}\r\n0\r\n\r\n'
            )
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return answer


def _path(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]
