"""Upstream admission and the keep-alive pool, in the manner of Envoy's circuit breakers.

Ordinary API calls and long-lived streams (WebSockets, server-sent events, bodies streamed
rather than buffered) draw on separate budgets of connections, so streams can never starve
short calls. A call waits at most `pool_timeout` for a slot; at most `max_pending` calls wait
at once, and the excess is refused at once. A stream never waits: with the stream budget
spent it is refused at once (`streams_full`), before its upload body is read. A call whose
response turns out to be a long stream moves to the stream budget, freeing its call slot.

Fairness under overload is a per-flow cap, as Envoy's per-route circuit breakers and the
partitioned limiters of concurrency-limit libraries do it: a flow is a route and the API
resource asked for (the first three path segments below the route's prefix, e.g.
`build/v1/commits`, so ids further down count as one flow), and one flow may hold at most
`flow_share` of the call connections and of the waiting slots. A slow resource flooded with
calls then fills its share, its excess waits or is refused at once, and calls to every
other resource still find a connection. A cap, not fair queuing: queuing only reorders who
waits, and with ten-second calls holding every connection the others would wait for ten
seconds whatever the order; a cap keeps connections free for them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, Literal

from .connection import Connection, UpstreamError, UpstreamTimeout
from .egress import EgressProxy, open_tunnel
from .framing import HeadLimits

__all__ = ["Budget", "Flow", "Lease", "Limits", "Pool", "Refused", "flow_of"]

# --log-level debug lines for the rare pool events (never one per request).
log = logging.getLogger("appcircle_proxy.upstream")

RefusalKind = Literal["pool_full", "pool_timeout", "streams_full", "flow_full"]
RETRY_AFTER: Final = 1
# A flow is keyed by this many path segments: service, version, resource.
FLOW_DEPTH: Final = 3

Flow = tuple[str, str]  # (route name, API resource)


def flow_of(route: str, target: str) -> Flow:
    """The flow of a request to `target` (the path below the route's prefix, with query)."""
    path = target.partition("?")[0].lstrip("/")
    return route, "/".join(path.split("/", FLOW_DEPTH)[:FLOW_DEPTH])


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    max_streams: int
    max_pending: int
    pool_timeout: float
    connect_timeout: float
    read_timeout: float
    # The largest share of the call connections (and of the waiting slots) one flow may hold.
    flow_share: float = 1.0
    response: HeadLimits = HeadLimits()


class Refused(Exception):
    """Admission refused: no slot in time, or too many waiting already."""

    def __init__(self, kind: RefusalKind, detail: str) -> None:
        super().__init__(detail)
        self.kind: RefusalKind = kind
        self.detail = detail
        self.retry_after = RETRY_AFTER


class Budget:
    """A count of slots, and the calls waiting for one (first come first served among those
    whose flow is below its cap). With `flow_limit`, no flow holds more than that many."""

    __slots__ = ("flow_limit", "held", "in_use", "limit", "name", "waiters")

    def __init__(self, name: str, limit: int, flow_limit: int | None = None) -> None:
        self.name = name
        self.limit = limit
        self.flow_limit = flow_limit
        self.in_use = 0
        # Slots held by each flow (only with a flow_limit), for the flows holding any.
        self.held: dict[Flow, int] = {}
        self.waiters: collections.deque[tuple[Flow | None, asyncio.Future[None]]] = (
            collections.deque()
        )

    def has_room(self, flow: Flow | None) -> bool:
        if self.in_use >= self.limit:
            return False
        return self.flow_limit is None or flow is None or self.held.get(flow, 0) < self.flow_limit

    def take(self, flow: Flow | None) -> None:
        self.in_use += 1
        self._count(flow, 1)

    def give_back(self, flow: Flow | None) -> None:
        """Free a slot, handing it straight to the first request still waiting whose flow
        may hold another."""
        self._count(flow, -1)
        for waiter in self.waiters:
            waiting_flow, future = waiter
            if future.done() or not self._below_cap(waiting_flow):
                continue
            self.waiters.remove(waiter)
            self._count(waiting_flow, 1)
            future.set_result(None)
            return
        self.in_use -= 1

    def _below_cap(self, flow: Flow | None) -> bool:
        return self.flow_limit is None or flow is None or self.held.get(flow, 0) < self.flow_limit

    def _count(self, flow: Flow | None, step: int) -> None:
        if self.flow_limit is None or flow is None:
            return
        held = self.held.get(flow, 0) + step
        if held:
            self.held[flow] = held
        else:
            del self.held[flow]


class Lease:
    """A slot in a budget, for a flow, and the connection that goes with it."""

    __slots__ = ("budget", "connection", "flow")

    def __init__(self, budget: Budget, connection: Connection, flow: Flow | None = None) -> None:
        self.budget = budget
        self.connection = connection
        self.flow = flow


class Pool:
    """Connections to one origin (the API host)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        limits: Limits,
        egress: EgressProxy | None = None,
    ) -> None:
        self._host = host
        # Every connection is then a CONNECT tunnel through this egress proxy.
        self._egress = egress
        self._port = port
        self._tls = tls
        self.limits = limits
        self.calls = Budget(
            "calls",
            limits.max_connections,
            max(1, int(limits.max_connections * limits.flow_share)),
        )
        self.streams = Budget("streams", limits.max_streams)
        self.pending = 0
        # Calls waiting, by flow; one flow may fill at most its share of max_pending.
        self._pending_by_flow: collections.Counter[Flow] = collections.Counter()
        self._flow_pending_limit = max(1, int(limits.max_pending * limits.flow_share))
        self._idle: list[Connection] = []

    def lease_now(self, *, stream: bool, flow: Flow | None = None) -> Lease | None:
        """A slot and a kept-alive connection when both are free at once; None otherwise
        (then `acquire`, which may wait or connect)."""
        budget = self.streams if stream else self.calls
        if not budget.has_room(flow):
            return None
        connection = self._idle_connection()
        if connection is None:
            return None
        budget.take(flow)
        return Lease(budget, connection, flow)

    async def acquire(
        self, *, stream: bool, flow: Flow | None = None, fresh: bool = False
    ) -> Lease:
        """A connection with a slot in the call or the stream budget; raises Refused, or
        UpstreamError when no connection can be made. With `fresh`, never a kept-alive
        one (for the retry after a stale connection failed)."""
        budget = self.streams if stream else self.calls
        await self.admit(budget, flow)
        try:
            connection = None if fresh else self._idle_connection()
            if connection is None:
                connection = await self._open()
        except BaseException:
            budget.give_back(flow)
            raise
        return Lease(budget, connection, flow)

    def check_stream_room(self) -> None:
        """Raises Refused (streams_full) when no stream slot is free now: for an upload to
        learn it before its body is read (the slot itself is taken by `acquire`)."""
        if not self.streams.has_room(None):
            raise self._streams_full()

    async def admit(self, budget: Budget, flow: Flow | None = None) -> None:
        """Take a slot in `budget`; a call waits at most pool_timeout, a stream not at all.
        Raises Refused."""
        if budget.has_room(flow):
            budget.take(flow)
            return
        if budget is self.streams:
            # A stream would hold the slot it waits for for minutes: waiting is pointless.
            raise self._streams_full()
        limits = self.limits
        if self.pending >= limits.max_pending:
            raise Refused(
                "pool_full",
                f"{self.pending} requests already wait for a connection to the API (the "
                f"{budget.name} budget of {budget.limit} is in use); retry shortly, or raise "
                "server.max_pending / appcircle.max_connections",
            )
        if flow is not None and self._pending_by_flow[flow] >= self._flow_pending_limit:
            raise Refused(
                "flow_full",
                f"{budget.held.get(flow, 0)} calls to {flow[1] or '/'} on route '{flow[0]}' hold "
                f"their share of the API connections and {self._flow_pending_limit} more wait; "
                "the API is slow on this path: retry later, or raise appcircle.flow_share",
            )
        loop = asyncio.get_running_loop()
        entry: tuple[Flow | None, asyncio.Future[None]] = (flow, loop.create_future())
        waiter = entry[1]
        budget.waiters.append(entry)
        self.pending += 1
        if flow is not None:
            self._pending_by_flow[flow] += 1
        waited = loop.time()
        try:
            async with asyncio.timeout(limits.pool_timeout):
                await waiter
            log.debug(
                "api %s budget full: waited %.1f ms for a connection",
                budget.name,
                (loop.time() - waited) * 1000,
            )
        except BaseException as err:
            if waiter.done() and not waiter.cancelled():
                budget.give_back(flow)  # handed a slot just as we gave up: pass it on
            else:
                waiter.cancel()
                budget.waiters.remove(entry)
            if isinstance(err, TimeoutError):
                raise Refused(
                    "pool_timeout",
                    f"no connection to the API was free within {limits.pool_timeout:g} s "
                    f"(all {budget.limit} of the {budget.name} budget are in use); retry "
                    "shortly, or raise appcircle.max_connections",
                ) from None
            raise
        finally:
            self.pending -= 1
            if flow is not None:
                self._pending_by_flow[flow] -= 1
                if not self._pending_by_flow[flow]:
                    del self._pending_by_flow[flow]

    async def reconnect(self, lease: Lease) -> Connection:
        """A new connection in place of the lease's (which is closed), same slot."""
        lease.connection.close()
        return await self._open()

    @asynccontextmanager
    async def slot(self, budget: Budget, flow: Flow | None = None) -> AsyncIterator[None]:
        """A slot in `budget` for the block's duration (for what the pool does not carry:
        WebSockets and the auth host's userinfo); raises Refused."""
        await self.admit(budget, flow)
        try:
            yield
        finally:
            budget.give_back(flow)

    def promote(self, lease: Lease) -> bool:
        """Move a call that turned into a long stream to the stream budget, without
        waiting; False when the stream budget is spent."""
        if lease.budget is self.streams:
            return True
        if not self.streams.has_room(None):
            return False
        self.streams.take(None)
        lease.budget.give_back(lease.flow)
        lease.budget = self.streams
        lease.flow = None
        return True

    def release(self, lease: Lease) -> None:
        """The exchange is over: keep the connection if it can carry another, free the slot."""
        connection = lease.connection
        connection.finish()
        if not connection.closed:
            if len(self._idle) >= self.limits.max_connections:
                # Ones the API closed while they sat idle count for nothing.
                self._idle = [idle for idle in self._idle if not idle.closed]
            if len(self._idle) < self.limits.max_connections:
                self._idle.append(connection)
            else:
                connection.close()
        lease.budget.give_back(lease.flow)

    def _streams_full(self) -> Refused:
        return Refused(
            "streams_full",
            f"all {self.streams.limit} long streams to the API are in use "
            "(appcircle.max_streams); retry shortly, or raise the limit",
        )

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    @property
    def idle(self) -> int:
        """Idle connections still open (read at scrape time, not on the request path)."""
        return sum(1 for connection in self._idle if not connection.closed)

    def _idle_connection(self) -> Connection | None:
        # Most recently used first: the likeliest to be still open at the API's end.
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _open(self) -> Connection:
        loop = asyncio.get_running_loop()
        limits = self.limits
        started = loop.time()
        try:
            async with asyncio.timeout(limits.connect_timeout):
                if self._egress is not None:
                    protocol = Connection(loop, limits.read_timeout, limits.response)
                    await open_tunnel(self._egress, self._host, self._port, protocol, self._tls)
                else:
                    _, protocol = await loop.create_connection(
                        lambda: Connection(loop, limits.read_timeout, limits.response),
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls is not None else None,
                    )
        except TimeoutError:
            raise UpstreamTimeout(
                f"no connection within {limits.connect_timeout:g} s (appcircle.connect_timeout)"
            ) from None
        except (OSError, ssl.SSLError) as err:
            raise UpstreamError(f"cannot connect: {err.strerror or err}") from None
        log.debug(
            "api new connection in %.1f ms (%d idle)", (loop.time() - started) * 1000, self.idle
        )
        return protocol
