"""Raw HTTP/1.1 over a socket, for requests no well-behaved client library would send."""

from __future__ import annotations

import asyncio
import json
from typing import Any


async def exchange(url: str, data: bytes, *, read_for: float = 2.0) -> bytes:
    """Send bytes to the server at `url` (http://host:port) and return all it answers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        try:
            async with asyncio.timeout(read_for):
                while chunk := await reader.read(65536):
                    chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def json_of(answer: bytes) -> Any:
    """The JSON body of a single answer."""
    return json.loads(answer.partition(b"\r\n\r\n")[2])
