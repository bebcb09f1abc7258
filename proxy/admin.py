"""The proxy's own endpoints under /_proxy/: liveness, readiness, Prometheus metrics.

They are served on the API port, or on their own `server.admin_listen` so that probes and
scrapers never share the port that can use the key. Never forwarded upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .app import Upstream
    from .observe import Metrics

__all__ = ["HEALTH_PATH", "ON_ADMIN_LISTENER", "add_routes", "create_admin_app"]

HEALTH_PATH = "/_proxy/health"
ON_ADMIN_LISTENER = web.AppKey("admin_elsewhere", bool)


def add_routes(
    router: web.UrlDispatcher, upstream_now: Callable[[], Upstream | None], metrics: Metrics
) -> None:
    """Add /_proxy/health, /ready and /metrics; `upstream_now` gives the running Upstream."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(request: web.Request) -> web.Response:
        upstream = upstream_now()
        if upstream is None:
            return web.json_response({"error": "starting", "detail": "starting up"}, status=503)
        waiting: dict[str, str] = {}
        # A reloaded key that failed: still ready while the previous token serves, but said.
        reload_failed: dict[str, str] = {}
        for route in upstream.routes:
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
            {"status": "ready", "routes": sorted(r.name for r in upstream.routes), **extra}
        )

    async def metrics_page(request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    router.add_get(HEALTH_PATH, health)
    router.add_get("/_proxy/ready", ready)
    router.add_get("/_proxy/metrics", metrics_page)


def create_admin_app(
    upstream_now: Callable[[], Upstream | None], metrics: Metrics
) -> web.Application:
    """The application for `server.admin_listen`: /_proxy/ and nothing else."""
    app = web.Application()
    add_routes(app.router, upstream_now, metrics)
    return app
