"""Upstream admission and the keep-alive pool, in the manner of Envoy's circuit breakers.

Ordinary API calls and long-lived streams (WebSockets, server-sent events, bodies streamed
rather than buffered) draw on separate budgets of connections, so streams can never starve
short calls. A request waits at most `pool_timeout` for a slot in its budget; at most
`max_pending` requests wait at once, and the excess is refused at once. A call whose
response turns out to be a long stream moves to the stream budget, freeing its call slot.
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
from .framing import HeadLimits

__all__ = ["Budget", "Lease", "Limits", "Pool", "Refused"]

# --log-level debug lines for the rare pool events (never one per request).
log = logging.getLogger("appcircle_proxy.upstream")

RefusalKind = Literal["pool_full", "pool_timeout", "streams_full"]
RETRY_AFTER: Final = 1


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    max_streams: int
    max_pending: int
    pool_timeout: float
    connect_timeout: float
    read_timeout: float
    response: HeadLimits = HeadLimits()


class Refused(Exception):
    """Admission refused: no slot in time, or too many waiting already."""

    def __init__(self, kind: RefusalKind, detail: str) -> None:
        super().__init__(detail)
        self.kind: RefusalKind = kind
        self.detail = detail
        self.retry_after = RETRY_AFTER


class Budget:
    """A count of slots and the requests waiting, first come first served, for one."""

    __slots__ = ("in_use", "limit", "name", "waiters")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.in_use = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def give_back(self) -> None:
        """Free a slot, handing it straight to the first request still waiting."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_use -= 1


class Lease:
    """A slot in a budget and the connection that goes with it."""

    __slots__ = ("budget", "connection")

    def __init__(self, budget: Budget, connection: Connection) -> None:
        self.budget = budget
        self.connection = connection


class Pool:
    """Connections to one origin (the API host)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        limits: Limits,
    ) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self.limits = limits
        self.calls = Budget("calls", limits.max_connections)
        self.streams = Budget("streams", limits.max_streams)
        self.pending = 0
        self._idle: list[Connection] = []

    def lease_now(self, *, stream: bool) -> Lease | None:
        """A slot and a kept-alive connection when both are free at once; None otherwise
        (then `acquire`, which may wait or connect)."""
        budget = self.streams if stream else self.calls
        if budget.in_use >= budget.limit:
            return None
        connection = self._idle_connection()
        if connection is None:
            return None
        budget.in_use += 1
        return Lease(budget, connection)

    async def acquire(self, *, stream: bool, fresh: bool = False) -> Lease:
        """A connection with a slot in the call or the stream budget; raises Refused, or
        UpstreamError when no connection can be made. With `fresh`, never a kept-alive
        one (for the retry after a stale connection failed)."""
        budget = self.streams if stream else self.calls
        await self.admit(budget)
        try:
            connection = None if fresh else self._idle_connection()
            if connection is None:
                connection = await self._open()
        except BaseException:
            budget.give_back()
            raise
        return Lease(budget, connection)

    async def admit(self, budget: Budget) -> None:
        """Take a slot in `budget`, waiting at most pool_timeout; raises Refused."""
        if budget.in_use < budget.limit:
            budget.in_use += 1
            return
        limits = self.limits
        if self.pending >= limits.max_pending:
            raise Refused(
                "pool_full",
                f"{self.pending} requests already wait for a connection to the API (the "
                f"{budget.name} budget of {budget.limit} is in use); retry shortly, or raise "
                "server.max_pending / appcircle.max_connections / appcircle.max_streams",
            )
        waiter = asyncio.get_running_loop().create_future()
        budget.waiters.append(waiter)
        self.pending += 1
        waited = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(limits.pool_timeout):
                await waiter
            log.debug(
                "api %s budget full: waited %.1f ms for a connection",
                budget.name,
                (asyncio.get_running_loop().time() - waited) * 1000,
            )
        except BaseException as err:
            if waiter.done() and not waiter.cancelled():
                budget.give_back()  # handed a slot just as we gave up: pass it on
            else:
                waiter.cancel()
            if isinstance(err, TimeoutError):
                raise Refused(
                    "pool_timeout",
                    f"no connection to the API was free within {limits.pool_timeout:g} s "
                    f"(all {budget.limit} of the {budget.name} budget are in use); retry "
                    "shortly, or raise appcircle.max_connections / appcircle.max_streams",
                ) from None
            raise
        finally:
            self.pending -= 1

    async def reconnect(self, lease: Lease) -> Connection:
        """A new connection in place of the lease's (which is closed), same slot."""
        lease.connection.close()
        return await self._open()

    @asynccontextmanager
    async def slot(self, budget: Budget) -> AsyncIterator[None]:
        """A slot in `budget` for the block's duration (for what the pool does not carry:
        WebSockets and the auth host's userinfo); raises Refused."""
        await self.admit(budget)
        try:
            yield
        finally:
            budget.give_back()

    def promote(self, lease: Lease) -> bool:
        """Move a call that turned into a long stream to the stream budget, without
        waiting; False when the stream budget is spent."""
        if lease.budget is self.streams:
            return True
        if self.streams.in_use >= self.streams.limit:
            return False
        self.streams.in_use += 1
        lease.budget.give_back()
        lease.budget = self.streams
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
        lease.budget.give_back()

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
