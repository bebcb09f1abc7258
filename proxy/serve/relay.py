"""The API's answer back to the client: a small one in one write, a large or open-ended one
streamed with backpressure both ways; a body the API cuts short cuts the client's
connection, the only way to tell the client it is incomplete."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from aiohttp import web
from multidict import CIMultiDict

from ..policy.headers import raw_response_headers, rewrite_location
from ..policy.routes import Route
from ..telemetry.facts import Facts
from ..telemetry.stats import Stats
from ..upstream.connection import Response, UpstreamError
from ..upstream.pool import Lease, Pool, Refused
from .call import IDEMPOTENT
from .failures import refusal, upstream_failed

__all__ = ["SMALL_BODY", "Decorate", "Relay"]

log = logging.getLogger("appcircle_proxy.forward")

# Responses up to this size (by Content-Length) are read whole and sent in one write;
# larger and unknown-length ones stream, and count as long streams.
SMALL_BODY: Final = 64 * 1024
NO_BODY_STATUSES: Final = frozenset({204, 304})

Decorate = Callable[[web.BaseRequest, CIMultiDict[str], Facts], None]


class Relay:
    """Relays answers from connections of `pool`; built once per process."""

    def __init__(self, api_url: str, pool: Pool, stats: Stats, send_timeout: float) -> None:
        self._api_url = api_url
        self._pool = pool
        self._stats = stats
        self._send_timeout = send_timeout

    async def relay(
        self,
        request: web.BaseRequest,
        facts: Facts,
        route: Route,
        lease: Lease,
        response: Response,
        decorate: Decorate,
    ) -> web.StreamResponse:
        def location(value: str) -> str:
            return rewrite_location(
                value, self._api_url, route.prefix, request.scheme, request.host
            )

        connection = lease.connection
        length = response.content_length
        no_body = request.method == "HEAD" or response.status in NO_BODY_STATUSES
        whole = not no_body and length is not None and length <= SMALL_BODY
        # A body sent whole gets its length from aiohttp; the API's must not disagree.
        headers = raw_response_headers(response.headers, location, keep_length=not whole)
        if no_body:
            empty = web.StreamResponse(status=response.status, reason=response.reason)
            empty.headers.extend(headers)
            decorate(request, empty.headers, facts)
            await empty.prepare(request)
            await empty.write_eof()
            return empty
        if whole:
            # Usually all here already: a small answer tends to come in one read.
            body = connection.body_if_complete()
            if body is None:
                try:
                    body = await connection.read_all()
                except UpstreamError as failure:
                    return upstream_failed(self._api_url, failure)
            # Decorated by the handler, as its own answers are, before aiohttp sends it.
            return web.Response(
                status=response.status, reason=response.reason, headers=headers, body=body
            )
        if not self._pool.promote(lease) and request.method in IDEMPOTENT:
            # Safe to refuse: the request may be sent again. One the API may have acted on
            # (a POST) is relayed on its call slot instead, whatever the stream budget says.
            streams = self._pool.streams.limit
            return refusal(
                self._stats,
                Refused(
                    "streams_full",
                    f"all {streams} long streams to the API are in use "
                    "(appcircle.max_streams); retry shortly, or raise the limit",
                ),
            )
        streamed = web.StreamResponse(status=response.status, reason=response.reason)
        streamed.headers.extend(headers)
        decorate(request, streamed.headers, facts)
        try:
            await streamed.prepare(request)
            while True:
                try:
                    chunk = await connection.read()
                except UpstreamError as failure:
                    log.warning(
                        "upstream failed mid-response for %s on route %s (%s); closing the "
                        "client connection",
                        request.method,
                        route.name,
                        failure.reason,
                    )
                    return _cut(request, streamed)
                if not chunk:
                    break
                facts.bytes_out += len(chunk)
                try:
                    async with asyncio.timeout(self._send_timeout):
                        await streamed.write(chunk)
                except TimeoutError:
                    # A client that takes nothing for this long would hold a stream slot
                    # and an API connection for ever.
                    log.info(
                        "client read nothing for %g s (server.send_timeout) during %s on "
                        "route %s; closing its connection",
                        self._send_timeout,
                        request.method,
                        route.name,
                    )
                    return _cut(request, streamed)
            await streamed.write_eof()
        except ConnectionResetError:
            log.debug("client went away during %s on route %s", request.method, route.name)
        return streamed


def _cut(request: web.BaseRequest, response: web.StreamResponse) -> web.StreamResponse:
    """End a streamed answer by closing the client's connection: the only way to tell the
    client the body is incomplete (ending it cleanly would pass off a truncated body)."""
    if request.transport is not None:
        request.transport.close()
    return response
