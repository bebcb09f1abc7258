"""Debug-level lines for the aiohttp client sessions (the auth host's, the WebSockets'):
connections opened, reused or waited for, and how long each call, such as a token exchange,
took. Only built with `--log-level debug`, so they cost nothing otherwise. Paths only: no
query, header or body. (The API pool logs its own events on the same logger.)"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import aiohttp

__all__ = ["debug_traces"]

log = logging.getLogger("appcircle_proxy.upstream")


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 1)


def debug_traces(peer: str) -> list[aiohttp.TraceConfig]:
    """Trace configs for an aiohttp client session talking to `peer` ("auth", "websocket");
    none unless debug logging is on."""
    if not log.isEnabledFor(logging.DEBUG):
        return []
    trace = aiohttp.TraceConfig()

    async def request_start(
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        _params: aiohttp.TraceRequestStartParams,
    ) -> None:
        context.started = time.perf_counter()

    async def request_end(
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        elapsed = _ms(context.started)
        log.debug(
            "%s %s %s answered %d in %.1f ms",
            peer,
            params.method,
            params.url.path,
            params.response.status,
            elapsed,
            extra={
                "fields": {
                    "peer": peer,
                    "path": params.url.path,
                    "status": params.response.status,
                    "ms": elapsed,
                }
            },
        )

    async def request_exception(
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        log.debug(
            "%s %s %s failed after %.1f ms: %s",
            peer,
            params.method,
            params.url.path,
            _ms(context.started),
            type(params.exception).__name__,
        )

    async def queued_start(
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        _params: aiohttp.TraceConnectionQueuedStartParams,
    ) -> None:
        context.queued = time.perf_counter()

    async def queued_end(
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        _params: aiohttp.TraceConnectionQueuedEndParams,
    ) -> None:
        log.debug("%s pool full: waited %.1f ms for a connection", peer, _ms(context.queued))

    async def create_start(
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        _params: aiohttp.TraceConnectionCreateStartParams,
    ) -> None:
        context.connecting = time.perf_counter()

    async def create_end(
        _session: aiohttp.ClientSession,
        context: SimpleNamespace,
        _params: aiohttp.TraceConnectionCreateEndParams,
    ) -> None:
        log.debug("%s new connection in %.1f ms", peer, _ms(context.connecting))

    async def reused(
        _session: aiohttp.ClientSession,
        _context: SimpleNamespace,
        _params: aiohttp.TraceConnectionReuseconnParams,
    ) -> None:
        log.debug("%s reused a kept-alive connection", peer)

    trace.on_request_start.append(request_start)
    trace.on_request_end.append(request_end)
    trace.on_request_exception.append(request_exception)
    trace.on_connection_queued_start.append(queued_start)
    trace.on_connection_queued_end.append(queued_end)
    trace.on_connection_create_start.append(create_start)
    trace.on_connection_create_end.append(create_end)
    trace.on_connection_reuseconn.append(reused)
    return [trace]
