"""One request upstream and its response back: route, token, headers, streaming, errors.

The flow, top to bottom in `Forwarder.handle`: match a route; decide whether the body can be
replayed; take the route's token; send; on a 401, renew and replay once if possible; stream
the answer back. Bodies are streamed both ways except a small one kept for a replay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import errors, websocket
from .exchange import SessionToken
from .headers import request_headers, response_headers
from .routes import Route, RouteTable
from .tokens import TokenUnavailable

__all__ = ["ROUTE", "UPSTREAM_SECONDS", "UPSTREAM_STATUS", "Forwarder"]

# What the forwarder learnt about a request, for the access log and the metrics.
ROUTE = web.RequestKey("route", str)
UPSTREAM_STATUS = web.RequestKey("upstream_status", int)
UPSTREAM_SECONDS = web.RequestKey("upstream_seconds", float)

log = logging.getLogger("appcircle_proxy.forward")

# The client's own headers must reach the API as sent; aiohttp would add these otherwise.
SKIP_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class _UpstreamFailed(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


@dataclass(frozen=True, slots=True)
class Forwarder:
    session: aiohttp.ClientSession = field(repr=False)
    api_url: str
    routes: RouteTable
    replay_limit: int

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path, has_query, query = request.raw_path.partition("?")
        matched = self.routes.match(path)
        if matched is None:
            return errors.no_route(path, self.routes.prefixes)
        route, rest = matched
        request[ROUTE] = route.name
        target = URL(self.api_url + rest + has_query + query, encoded=True)
        if websocket.is_upgrade(request):
            return await websocket.relay(
                request, self.session, route, target, request_headers(request.headers)
            )
        replayable = await self._replayable_body(request)
        headers = request_headers(request.headers)
        try:
            token = await route.tokens.get()
            upstream = await self._send(request, target, headers, token, replayable)
            # A replay only with another token: a 401 renews at most once per
            # tokens.min_renew_interval, else the 401 is the API's answer (issue 8).
            if upstream.status == 401 and route.tokens.invalidate(token):
                if replayable is not None:
                    upstream.release()
                    token = await route.tokens.get()
                    upstream = await self._send(request, target, headers, token, replayable)
        except TokenUnavailable as problem:
            return errors.token_unavailable(route, problem)
        except _UpstreamFailed as failure:
            return failure.response
        try:
            return await self._relay(request, route, upstream)
        finally:
            # Back to the pool if the body was read to the end; otherwise aiohttp closes it.
            upstream.release()

    async def _replayable_body(self, request: web.Request) -> bytes | None:
        """The whole body when it is small enough to send twice, else None (stream it)."""
        if not request.body_exists:
            return b""
        length = request.content_length
        if length is not None and length <= self.replay_limit:
            return await request.content.read()
        return None

    async def _send(
        self,
        request: web.Request,
        target: URL,
        headers: CIMultiDict[str],
        token: SessionToken,
        replayable: bytes | None,
    ) -> aiohttp.ClientResponse:
        headers["Authorization"] = f"Bearer {token.value}"
        started = time.monotonic()
        try:
            upstream = await self.session.request(
                request.method,
                target,
                headers=headers,
                data=request.content if replayable is None else (replayable or None),
                allow_redirects=False,
                skip_auto_headers=SKIP_AUTO_HEADERS,
                compress=None,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise _UpstreamFailed(errors.upstream_timeout(self.api_url)) from None
        except aiohttp.ClientError as err:
            raise _UpstreamFailed(errors.upstream_unreachable(self.api_url, str(err))) from None
        request[UPSTREAM_SECONDS] = time.monotonic() - started
        request[UPSTREAM_STATUS] = upstream.status
        return upstream

    async def _relay(
        self, request: web.Request, route: Route, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(response_headers(upstream.headers))
        if location := upstream.headers.get("Location"):
            response.headers["Location"] = self._rewrite_location(location, request, route)
        try:
            await response.prepare(request)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (TimeoutError, aiohttp.ClientError) as err:
                    # The body is cut short. Closing the client's connection is the only way
                    # to tell it so; ending the body cleanly would pass off a truncated file
                    # as whole.
                    log.warning(
                        "upstream failed mid-response for %s %s (%s); closing the client "
                        "connection",
                        request.method,
                        route.name,
                        type(err).__name__,
                    )
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            # The client hung up; the upstream response is dropped with it (see `handle`).
            log.debug("client went away during %s %s", request.method, route.name)
        return response

    def _rewrite_location(self, location: str, request: web.Request, route: Route) -> str:
        """Point a redirect at the API host back through the proxy and the route's prefix."""
        api = URL(self.api_url)
        target = URL(location, encoded=True)
        if target.is_absolute():
            if target.origin() != api.origin():
                return location
        elif not location.startswith("/") or location.startswith("//"):
            return location
        base = api.raw_path.rstrip("/")
        path = target.raw_path
        if base and not (path == base or path.startswith(base + "/")):
            return location
        below = path[len(base) :] or "/"
        prefix = "" if route.prefix == "/" else route.prefix
        rewritten = f"{request.scheme}://{request.host}{prefix}{below}"
        if target.raw_query_string:
            rewritten += "?" + target.raw_query_string
        if target.raw_fragment:
            rewritten += "#" + target.raw_fragment
        return rewritten
