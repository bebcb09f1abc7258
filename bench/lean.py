"""The lean floor, the benchmark's other yardstick: what the proxy's design costs with none
of its features.

    python bench/lean.py PORT UPSTREAM_URL

aiohttp's low-level `web.Server` and a keep-alive pool of asyncio protocols on httptools,
as the proxy's forwarding path has them, and nothing else: no guard, routes, tokens,
admission, timeouts, metrics or access log; small bodies only (each answer is read whole),
a fixed Authorization header, uvloop. Not a proxy anyone should run: the distance between
its CPU per request and the proxy's is what the proxy's features cost.
"""

import asyncio
import sys

import httptools
import uvloop
from aiohttp import web

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.done is not None:
            self.done.set_result(None)


IDLE: list[Upstream] = []


async def handle(request: web.BaseRequest) -> web.Response:
    loop = asyncio.get_running_loop()
    if IDLE:
        upstream = IDLE.pop()
    else:
        _, upstream = await loop.create_connection(Upstream, HOST, PORT)
    upstream.done = loop.create_future()
    assert upstream.transport is not None
    upstream.transport.write(
        f"{request.method} {request.raw_path} HTTP/1.1\r\nHost: {HOST}\r\n"
        "Authorization: Bearer lean-fixed-token\r\n\r\n".encode()
    )
    await upstream.done
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in upstream.headers
        if name.lower() not in HOP
    ]
    response = web.Response(
        status=upstream.parser.get_status_code(), headers=headers, body=b"".join(upstream.body)
    )
    IDLE.append(upstream)
    return response


async def main(port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    HOST, _, port = sys.argv[2].removeprefix("http://").rstrip("/").partition(":")
    PORT = int(port)
    uvloop.run(main(int(sys.argv[1])))
