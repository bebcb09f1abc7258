"""The proxy's own endpoints under /_proxy/: liveness, readiness, Prometheus metrics.

They are served on the API port (dispatched by the request handler, behind its guard), or
on their own `server.admin_listen` so that probes and scrapers never share the port that
can use the key. Never forwarded upstream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from ..paths import HEALTH_PATH, METRICS_PATH, READY_PATH
from ..policy import errors

if TYPE_CHECKING:
    from .handler import AdminHandler
    from .runtime import Runtime

__all__ = ["admin_handlers", "create_admin_server"]


def admin_handlers(
    runtime_now: Callable[[], Runtime | None],
    metrics_now: Callable[[], Awaitable[tuple[bytes, str]]],
) -> dict[str, AdminHandler]:
    """/_proxy/health, /ready and /metrics by path; `runtime_now` gives the running state,
    `metrics_now` the Prometheus text (of every worker) and its content type."""

    async def health(request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(request: web.BaseRequest) -> web.Response:
        runtime = runtime_now()
        if runtime is None:
            return web.json_response({"error": "starting", "detail": "starting up"}, status=503)
        waiting: dict[str, str] = {}
        # A reloaded key that failed: still ready while the previous token serves, but said.
        reload_failed: dict[str, str] = {}
        for route in runtime.routes:
            if route.tokens.current() is None:
                failure = route.tokens.failure
                waiting[route.name] = failure.detail if failure else "no session token yet"
            if (reload_failure := route.tokens.reload_failure) is not None:
                reload_failed[route.name] = reload_failure.detail
        extra = {"reload_failed": reload_failed} if reload_failed else {}
        if waiting:
            return web.json_response(
                {
                    "error": "not_ready",
                    "detail": f"{len(waiting)} route(s) hold no valid session token",
                    "routes": waiting,
                    **extra,
                },
                status=503,
            )
        return web.json_response(
            {"status": "ready", "routes": sorted(r.name for r in runtime.routes), **extra}
        )

    async def metrics(request: web.BaseRequest) -> web.Response:
        body, content_type = await metrics_now()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    return {HEALTH_PATH: health, READY_PATH: ready, METRICS_PATH: metrics}


def create_admin_server(handlers: dict[str, AdminHandler]) -> web.Server:
    """The server for `server.admin_listen`: /_proxy/ and nothing else."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        handler = handlers.get(request.path)
        if handler is None or request.method not in ("GET", "HEAD"):
            return errors.refused(
                404,
                "not_found",
                "this is the proxy's admin listener: /_proxy/health, /_proxy/ready and "
                "/_proxy/metrics only",
            )
        return await handler(request)

    return web.Server(handle, access_log=None)
