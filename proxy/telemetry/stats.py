"""Traffic statistics as plain integers, rendered as Prometheus metrics at scrape time.

The request path only adds to dicts of ints (a label lookup in prometheus-client costs
about 8 µs a request; this costs a fraction of one). When /_proxy/metrics is read, they are
taken with the token, pool and process state into a `Snapshot` of plain numbers; with
--workers, the snapshots of every worker are summed (`merge`) and rendered once, so one
scrape shows the whole proxy.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from .. import __version__

if TYPE_CHECKING:
    from prometheus_client.core import Metric


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


__all__ = ["NO_ROUTE", "Snapshot", "Stats", "exposition", "merge", "take_snapshot"]

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


# A series: its family's short name and its label values, in the order rendering uses.
Series = tuple[str, ...]


@dataclass(slots=True)
class Snapshot:
    """One process's metrics at one moment, as plain numbers (JSON-able, to travel between
    workers). Counters are summed over workers; gauges too, except those in MIN_GAUGES."""

    counters: dict[Series, float] = field(default_factory=dict)
    gauges: dict[Series, float] = field(default_factory=dict)

    def as_data(self) -> dict[str, Any]:
        """For json.dumps."""
        return {"counters": list(self.counters.items()), "gauges": list(self.gauges.items())}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Snapshot:
        """From json.loads of `as_data()`; KeyError or ValueError if it is not one."""
        return cls(
            {tuple(map(str, key)): float(value) for key, value in data["counters"]},
            {tuple(map(str, key)): float(value) for key, value in data["gauges"]},
        )


# Gauges for which the sum over workers means nothing: the soonest expiry, the earliest
# start, the smallest limit.
MIN_GAUGES: Final = frozenset({"token_expiry", "process_start_time", "process_max_fds"})


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    total = Snapshot()
    for snapshot in snapshots:
        for key, value in snapshot.counters.items():
            total.counters[key] = total.counters.get(key, 0) + value
        for key, value in snapshot.gauges.items():
            if key in total.gauges and key[0] in MIN_GAUGES:
                total.gauges[key] = min(total.gauges[key], value)
            else:
                total.gauges[key] = total.gauges.get(key, 0) + value
    return total


def take_snapshot(stats: Stats, runtime: Runtime | None, clock: Callable[[], float]) -> Snapshot:
    """This process's metrics now: traffic, tokens, pool, and the process itself."""
    from prometheus_client.process_collector import ProcessCollector

    snapshot = Snapshot()
    counters, gauges = snapshot.counters, snapshot.gauges
    for (route, method, status), count in list(stats.requests.items()):
        key = ("requests", route, method, f"{status // 100}xx")
        counters[key] = counters.get(key, 0) + count
    for route, count in list(stats.bytes_in.items()):
        counters[("request_bytes", route)] = count
    for route, count in list(stats.bytes_out.items()):
        counters[("response_bytes", route)] = count
    for route, observed in list(stats.latency.items()):
        for index, count in enumerate(observed.counts):
            counters[("latency", route, str(index))] = count
        counters[("latency_sum", route)] = observed.total
    for kind, count in list(stats.refused.items()):
        counters[("refused", kind)] = count
    for (client, route, status_class), count in list(stats.clients.items()):
        counters[("client_requests", client, route, status_class)] = count
    gauges[("in_flight",)] = stats.in_flight
    if runtime is not None:
        for served in runtime.routes:
            for outcome, count in served.tokens.outcomes.items():
                counters[("token_exchanges", served.name, outcome)] = count
            counters[("token_waits", served.name)] = served.tokens.waits
            token = served.tokens.current()
            if token is not None:
                gauges[("token_expiry", served.name)] = token.expires_at - clock()
        pool = runtime.pool
        gauges[("upstream_connections", "idle")] = pool.idle
        gauges[("upstream_connections", "calls")] = pool.calls.in_use
        gauges[("upstream_connections", "streams")] = pool.streams.in_use
        gauges[("pending",)] = pool.pending
    # prometheus-client reads /proc/self (on Linux; elsewhere it yields nothing).
    shorts = {name: (short, kind) for short, kind, name, _text in PROCESS}
    for family in ProcessCollector(registry=None).collect():
        for sample in family.samples:
            known = shorts.get(sample.name.removesuffix("_total"))
            if known is not None:
                short, kind = known
                (counters if kind == "counter" else gauges)[(short,)] = sample.value
    return snapshot


# (name, type, help) of the process_* families, as prometheus-client's own, said for workers.
PROCESS: Final = (
    ("process_cpu", "counter", "process_cpu_seconds", "CPU time (user and system), in seconds"),
    ("process_virtual_memory", "gauge", "process_virtual_memory_bytes", "Virtual memory size"),
    ("process_resident_memory", "gauge", "process_resident_memory_bytes", "Resident memory"),
    ("process_open_fds", "gauge", "process_open_fds", "Open file descriptors"),
    ("process_max_fds", "gauge", "process_max_fds", "Maximum open file descriptors"),
    ("process_start_time", "gauge", "process_start_time_seconds", "Start time, Unix seconds"),
)


def _families(snapshot: Snapshot, workers: int | None) -> Iterator[Metric]:
    """`snapshot` as metric families; `workers` (with --workers) says how many were summed,
    and each help text says whether its value is summed over them or chosen among them."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        InfoMetricFamily,
    )

    counters, gauges = snapshot.counters, snapshot.gauges
    summed = " (summed over the workers)" if workers else ""

    def series(name: str, values: dict[Series, float]) -> list[tuple[list[str], float]]:
        return sorted((list(key[1:]), value) for key, value in values.items() if key[0] == name)

    def counter(name: str, short: str, text: str, labels: list[str]) -> Metric:
        family = CounterMetricFamily(name, text + summed, labels=labels)
        for values, value in series(short, counters):
            family.add_metric(values, value)
        return family

    def gauge(name: str, short: str, text: str, labels: list[str], how: str = "") -> Metric:
        family = GaugeMetricFamily(name, text + (how if workers and how else summed), labels=labels)
        for values, value in series(short, gauges):
            family.add_metric(values, value)
        return family

    info = InfoMetricFamily("appcircle_proxy_build", "The proxy's version")
    info.add_metric([], {"version": __version__})
    yield info
    yield counter(
        "appcircle_proxy_requests",
        "requests",
        "Requests answered, by route, method and status class",
        ["route", "method", "status_class"],
    )
    yield counter(
        "appcircle_proxy_request_bytes",
        "request_bytes",
        "Request body bytes received from clients",
        ["route"],
    )
    yield counter(
        "appcircle_proxy_response_bytes", "response_bytes", "Response body bytes sent to clients",
        ["route"],
    )  # fmt: skip
    latency = HistogramMetricFamily(
        "appcircle_proxy_upstream_latency_seconds",
        "Time from sending a request upstream to its response headers" + summed,
        labels=["route"],
    )
    for (route,), total in series("latency_sum", counters):
        cumulative, buckets = 0.0, []
        for index, bound in enumerate((*BUCKETS, float("inf"))):
            cumulative += counters.get(("latency", route, str(index)), 0)
            buckets.append((_bound(bound), cumulative))
        latency.add_metric([route], buckets, total)
    yield latency
    yield gauge("appcircle_proxy_in_flight_requests", "in_flight", "Requests being handled now", [])
    if workers:
        restarts = CounterMetricFamily(
            "appcircle_proxy_worker_restarts",
            "Times a worker was re-forked after its process died (--workers)",
        )
        restarts.add_metric([], counters.get(("worker_restarts",), 0))
        yield restarts
        count = GaugeMetricFamily("appcircle_proxy_workers", "Worker processes serving now")
        count.add_metric([], workers)
        yield count
    yield counter(
        "appcircle_proxy_refused",
        "refused",
        "Requests refused by upstream admission (pool_full, pool_timeout, streams_full, flow_full)",
        ["reason"],
    )
    yield counter(
        "appcircle_proxy_client_requests",
        "client_requests",
        "Requests answered, by the client their token named, route and status class",
        ["client", "route", "status_class"],
    )
    yield counter(
        "appcircle_proxy_token_exchanges",
        "token_exchanges",
        "Token exchanges with the auth host, by route and outcome",
        ["route", "outcome"],
    )
    yield counter(
        "appcircle_proxy_token_waits",
        "token_waits",
        "Requests that waited for a token exchange (after the first, renewal was late)",
        ["route"],
    )
    yield gauge(
        "appcircle_proxy_token_expiry_seconds",
        "token_expiry",
        "Seconds until the route's current session token expires (absent: no token)",
        ["route"],
        " (each worker holds its own token: the soonest to expire)",
    )
    yield gauge(
        "appcircle_proxy_upstream_connections",
        "upstream_connections",
        "Connections to the API host: idle, in use by calls, in use by streams",
        ["state"],
    )
    yield gauge(
        "appcircle_proxy_pending_requests",
        "pending",
        "Requests waiting for a connection to the API host",
        [],
    )
    for short, kind, name, text in PROCESS:
        if kind == "counter":
            yield counter(name, short, text, [])
        elif short in MIN_GAUGES:
            yield gauge(name, short, text, [], " (of each worker: the smallest)")
        else:
            yield gauge(name, short, text, [])


def exposition(snapshot: Snapshot, workers: int | None = None) -> tuple[bytes, str]:
    """The Prometheus text of `snapshot`, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    class _Rendered:
        def collect(self) -> Iterator[Metric]:
            return _families(snapshot, workers)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Rendered())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
