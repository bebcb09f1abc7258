"""Traffic statistics as plain integers, rendered as Prometheus metrics at scrape time.

The request path only adds to dicts of ints (a label lookup in prometheus-client costs
about 8 µs a request; this costs a fraction of one); a `Collector` turns them into metric
families when /_proxy/metrics is read, as it does for the token and pool state.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


# What the scrape reads of the running proxy, as the shapes it needs: telemetry sits below
# the layers that own routes, tokens and the pool, and imports none of them.
class _Token(Protocol):
    @property
    def expires_at(self) -> float: ...


class _TokenSource(Protocol):
    @property
    def outcomes(self) -> Mapping[str, int]: ...
    @property
    def waits(self) -> int: ...
    def current(self) -> _Token | None: ...


class _Route(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def tokens(self) -> _TokenSource: ...


class _Budget(Protocol):
    @property
    def in_use(self) -> int: ...


class _Pool(Protocol):
    @property
    def idle(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def calls(self) -> _Budget: ...
    @property
    def streams(self) -> _Budget: ...


class Runtime(Protocol):
    """The running proxy as the metrics see it."""

    @property
    def routes(self) -> Iterable[_Route]: ...
    @property
    def pool(self) -> _Pool: ...


__all__ = ["NO_ROUTE", "Stats", "registry"]

NO_ROUTE: Final = "-"
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
# prometheus-client's default buckets, in seconds.
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class _Latency:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0


class Stats:
    """What the request path counts; read only by the collector."""

    def __init__(self) -> None:
        # By (route, method, status); summed into status classes at scrape time.
        self.requests: dict[tuple[str, str, int], int] = {}
        self.bytes_in: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}
        self.latency: dict[str, _Latency] = {}
        self.refused: dict[str, int] = {}
        # By (client, route, status class), for requests that named a client by its token.
        self.clients: dict[tuple[str, str, str], int] = {}
        self.in_flight = 0
        # With --workers: how often this worker's slot was re-forked after its process died.
        self.worker_restarts: int | None = None

    def record(
        self,
        route: str,
        method: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        upstream_seconds: float | None,
    ) -> None:
        if method not in KNOWN_METHODS:
            method = "other"
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.bytes_in[route] = self.bytes_in.get(route, 0) + bytes_in
        self.bytes_out[route] = self.bytes_out.get(route, 0) + bytes_out
        if upstream_seconds is not None:
            latency = self.latency.get(route)
            if latency is None:
                latency = self.latency[route] = _Latency()
            latency.counts[bisect.bisect_left(BUCKETS, upstream_seconds)] += 1
            latency.total += upstream_seconds

    def record_client(self, client: str, route: str, status: int) -> None:
        key = (client, route, f"{status // 100}xx")
        self.clients[key] = self.clients.get(key, 0) + 1

    def refusal(self, kind: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1


class _Collector(Collector):
    def __init__(
        self, stats: Stats, runtime: Callable[[], Runtime | None], clock: Callable[[], float]
    ) -> None:
        self._stats = stats
        self._runtime = runtime
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        runtime = self._runtime()
        if runtime is not None:
            yield from self._tokens(runtime)
            yield from self._pool(runtime)

    def _traffic(self) -> Iterator[Metric]:
        stats = self._stats
        requests = CounterMetricFamily(
            "appcircle_proxy_requests",
            "Requests answered, by route, method and status class",
            labels=["route", "method", "status_class"],
        )
        by_class: dict[tuple[str, str, str], int] = {}
        for (route, method, status), count in list(stats.requests.items()):
            key = (route, method, f"{status // 100}xx")
            by_class[key] = by_class.get(key, 0) + count
        for labels, count in sorted(by_class.items()):
            requests.add_metric(list(labels), count)
        yield requests
        for name, what, values in (
            ("request", "Request body bytes received from clients", stats.bytes_in),
            ("response", "Response body bytes sent to clients", stats.bytes_out),
        ):
            family = CounterMetricFamily(f"appcircle_proxy_{name}_bytes", what, labels=["route"])
            for route, count in sorted(values.items()):
                family.add_metric([route], count)
            yield family
        latency = HistogramMetricFamily(
            "appcircle_proxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            labels=["route"],
        )
        for route, observed in sorted(stats.latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*BUCKETS, float("inf")), observed.counts, strict=True):
                cumulative += count
                buckets.append((_bound(bound), float(cumulative)))
            latency.add_metric([route], buckets, observed.total)
        yield latency
        yield GaugeMetricFamily(
            "appcircle_proxy_in_flight_requests", "Requests being handled now", stats.in_flight
        )
        if stats.worker_restarts is not None:
            yield GaugeMetricFamily(
                "appcircle_proxy_worker_restarts",
                "Times this worker was re-forked after its process died (--workers)",
                stats.worker_restarts,
            )
        refused = CounterMetricFamily(
            "appcircle_proxy_refused",
            "Requests refused by upstream admission (pool_full, pool_timeout, streams_full, "
            "flow_full)",
            labels=["reason"],
        )
        for kind, count in sorted(stats.refused.items()):
            refused.add_metric([kind], count)
        yield refused
        clients = CounterMetricFamily(
            "appcircle_proxy_client_requests",
            "Requests answered, by the client their token named, route and status class",
            labels=["client", "route", "status_class"],
        )
        for labels, count in sorted(stats.clients.items()):
            clients.add_metric(list(labels), count)
        yield clients

    def _tokens(self, runtime: Runtime) -> Iterator[Metric]:
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
        for route in runtime.routes:
            for outcome, count in sorted(route.tokens.outcomes.items()):
                exchanges.add_metric([route.name, outcome], count)
            waits.add_metric([route.name], route.tokens.waits)
            token = route.tokens.current()
            if token is not None:
                expiry.add_metric([route.name], token.expires_at - self._clock())
        yield exchanges
        yield waits
        yield expiry

    def _pool(self, runtime: Runtime) -> Iterator[Metric]:
        pool = runtime.pool
        connections = GaugeMetricFamily(
            "appcircle_proxy_upstream_connections",
            "Connections to the API host: idle, in use by calls, in use by streams",
            labels=["state"],
        )
        connections.add_metric(["idle"], pool.idle)
        connections.add_metric(["calls"], pool.calls.in_use)
        connections.add_metric(["streams"], pool.streams.in_use)
        yield connections
        yield GaugeMetricFamily(
            "appcircle_proxy_pending_requests",
            "Requests waiting for a connection to the API host",
            pool.pending,
        )


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def registry(
    stats: Stats, runtime: Callable[[], Runtime | None], clock: Callable[[], float]
) -> CollectorRegistry:
    """A registry of the proxy's metrics (one per app, so tests can run many)."""
    result = CollectorRegistry()
    result.register(_Collector(stats, runtime, clock))
    return result
