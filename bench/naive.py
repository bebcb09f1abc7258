"""A naive aiohttp proxy, the benchmark's yardstick: what 30 lines of aiohttp do.

    python bench/naive.py PORT UPSTREAM_URL

One ClientSession (auto_decompress=False), bodies streamed both ways, a fixed
Authorization header, uvloop. No guard, routes, tokens, metrics or access log.
"""

import sys
from collections.abc import AsyncIterator

import uvloop
from aiohttp import ClientSession, DummyCookieJar, web

SESSION = web.AppKey("session", ClientSession)
HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


async def handle(request: web.Request) -> web.StreamResponse:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    headers["Authorization"] = "Bearer naive-fixed-token"
    body = request.content if request.body_exists else None
    url = UPSTREAM + request.raw_path
    async with request.app[SESSION].request(
        request.method, url, headers=headers, data=body, allow_redirects=False
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP:
                response.headers.add(name, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = ClientSession(cookie_jar=DummyCookieJar(), auto_decompress=False)
    yield
    await app[SESSION].close()


if __name__ == "__main__":
    UPSTREAM = sys.argv[2].rstrip("/")
    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, loop=loop)
