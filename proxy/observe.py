"""What the proxy tells operators about its traffic: Prometheus metrics and the access log.

Both read the facts the forwarder leaves on each request (route, upstream status and
latency); token state is read from the token sources at scrape time, so the request path
and the renewal loop know nothing of either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .forward import ROUTE, UPSTREAM_SECONDS, UPSTREAM_STATUS
from .routes import RouteTable

if TYPE_CHECKING:
    from .app import Upstream

__all__ = ["Metrics", "access_logger"]

NO_ROUTE: Final = "-"
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)

Handler = Callable[[web.Request], Any]


class _TokenCollector(Collector):
    def __init__(self, upstream: Callable[[], Upstream | None], clock: Callable[[], float]):
        self._upstream = upstream
        self._clock = clock

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        exchanges = CounterMetricFamily(
            "appcircle_proxy_token_exchanges",
            "Token exchanges with the auth host, by route and outcome",
            labels=["route", "outcome"],
        )
        waits = CounterMetricFamily(
            "appcircle_proxy_token_waits",
            "Requests that waited for a token exchange (after the first, renewal was late)",
            labels=["route"],
        )
        expiry = GaugeMetricFamily(
            "appcircle_proxy_token_expiry_seconds",
            "Seconds until the route's current session token expires (absent: no token)",
            labels=["route"],
        )
        upstream = self._upstream()
        routes: RouteTable | tuple[()] = upstream.routes if upstream is not None else ()
        for route in routes:
            for outcome, count in sorted(route.tokens.outcomes.items()):
                exchanges.add_metric([route.name, outcome], count)
            waits.add_metric([route.name], route.tokens.waits)
            token = route.tokens.current()
            if token is not None:
                expiry.add_metric([route.name], token.expires_at - self._clock())
        yield exchanges
        yield waits
        yield expiry


class Metrics:
    """The proxy's metrics, in a registry of their own (one per app, so tests can run many)."""

    def __init__(self, upstream: Callable[[], Upstream | None], clock: Callable[[], float]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "appcircle_proxy_requests",
            "Requests answered, by route, method and status class",
            ["route", "method", "status_class"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "appcircle_proxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            ["route"],
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "appcircle_proxy_request_bytes",
            "Request body bytes received from clients",
            ["route"],
            registry=self.registry,
        )
        self.bytes_out = Counter(
            "appcircle_proxy_response_bytes",
            "Response body bytes sent to clients",
            ["route"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "appcircle_proxy_in_flight_requests",
            "Requests being handled now",
            registry=self.registry,
        )
        self.registry.register(_TokenCollector(upstream, clock))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.in_flight.inc()
        status = 500
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exception:
            status = exception.status
            raise
        finally:
            self.in_flight.dec()
            self._record(request, status)

    def _record(self, request: web.Request, status: int) -> None:
        route = request.get(ROUTE, NO_ROUTE)
        method = request.method if request.method in KNOWN_METHODS else "other"
        self.requests.labels(route, method, f"{status // 100}xx").inc()
        self.bytes_in.labels(route).inc(request.content.total_bytes)
        if UPSTREAM_SECONDS in request:
            self.upstream_latency.labels(route).observe(request[UPSTREAM_SECONDS])

    def count_response_bytes(self, request: web.Request, response: web.StreamResponse) -> None:
        self.bytes_out.labels(request.get(ROUTE, NO_ROUTE)).inc(response.body_length)


def access_logger(
    query_strings: bool, on_response: Callable[[web.Request, web.StreamResponse], None]
) -> type[AbstractAccessLogger]:
    """An aiohttp access logger writing one structured line per request."""

    class AccessLogger(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            assert isinstance(request, web.Request)
            on_response(request, response)
            if not self.logger.isEnabledFor(logging.INFO):
                return  # the byte counts above are metrics; the line itself is not wanted
            path = request.raw_path if query_strings else request.raw_path.partition("?")[0]
            fields = {
                "route": request.get(ROUTE, NO_ROUTE),
                "method": request.method,
                "path": path,
                "status": response.status,
                "upstream_status": request.get(UPSTREAM_STATUS, NO_ROUTE),
                "duration_ms": round(time * 1000, 1),
                "bytes_in": request.content.total_bytes,
                "bytes_out": response.body_length,
            }
            self.logger.info(
                "%s %s %s -> %s",
                request.method,
                path,
                fields["route"],
                response.status,
                extra={"fields": fields},
            )

        @property
        def enabled(self) -> bool:
            return True

    return AccessLogger
