"""The token cache and the renewal loop: when to exchange, never how.

One `TokenSource` per (credential, organization) pair. It runs one background loop with
explicit states (exchanging, holding a token until renewal is due, backing off after a
failure), in the manner of Vault Proxy's auth handler. The request path only reads: it takes
the cached token, or waits for the loop's next outcome when there is none, or fails fast
while the loop backs off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cachetools import TLRUCache

from .exchange import ExchangeError, Exchanger, SessionToken

__all__ = [
    "Clock",
    "RetryPolicy",
    "TokenCache",
    "TokenKey",
    "TokenSource",
    "TokenSources",
    "TokenUnavailable",
]

log = logging.getLogger("appcircle_proxy.tokens")

Clock = Callable[[], float]
TokenKey = tuple[str, str | None]  # (credential name, sub-organization id or None for its own)


class TokenUnavailable(Exception):
    """No valid token now. Carries the last failure and when the next attempt is due."""

    def __init__(self, failure: ExchangeError, retry_after: float) -> None:
        super().__init__(failure.detail)
        self.failure = failure
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped: initial, 2x, 4x ... up to maximum."""

    initial: float
    maximum: float
    random: Callable[[], float] = field(default=random.random, repr=False)

    def delay(self, failures: int) -> float:
        ceiling = min(self.maximum, self.initial * 2.0 ** min(failures - 1, 62))
        # Half fixed, half random: never sooner than half the step, so a dead auth host is
        # not hammered, and proxies that failed together do not retry in lockstep.
        return ceiling * (0.5 + self.random() / 2)


class TokenCache:
    """Tokens by key; an entry vanishes by itself once its token is no longer usable."""

    def __init__(self, clock: Clock, maxsize: int = 1024) -> None:
        self._entries: TLRUCache[TokenKey, SessionToken] = TLRUCache(
            maxsize, ttu=lambda _key, token, _now: token.usable_until, timer=clock
        )

    def get(self, key: TokenKey) -> SessionToken | None:
        return self._entries.get(key)

    def put(self, key: TokenKey, token: SessionToken) -> None:
        self._entries[key] = token

    def discard(self, key: TokenKey, token: SessionToken) -> bool:
        """Drop `token` if it is still the cached one; True when it was."""
        if self._entries.get(key) is token:
            del self._entries[key]
            return True
        return False


class TokenSource:
    """Keeps one key's token for one organization fresh, with single-flight exchanges."""

    def __init__(
        self,
        key: TokenKey,
        exchanger: Exchanger,
        cache: TokenCache,
        retry: RetryPolicy,
        clock: Clock,
    ) -> None:
        self.key = key
        self._exchanger = exchanger
        self._cache = cache
        self._retry = retry
        self._clock = clock
        self._failures = 0
        self._failure: ExchangeError | None = None
        self._retry_at = 0.0
        self._exchanging = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._next_outcome: asyncio.Future[None] | None = None
        self.exchanges = 0
        # Exchange outcomes by kind ("ok" or a failure kind), read by the metrics.
        self.outcomes: collections.Counter[str] = collections.Counter()
        # Requests that had to wait for an exchange (ideally one per route, the first).
        self.waits = 0
        # Names of the routes this source serves, for the logs.
        self.routes: list[str] = []

    def __repr__(self) -> str:
        return f"<TokenSource {self.key!r} exchanges={self.exchanges}>"

    def replace_exchanger(self, exchanger: Exchanger, *, drop_token: bool) -> None:
        """Use a reloaded credential from now on; with `drop_token`, renew at once."""
        self._exchanger = exchanger
        if drop_token:
            token = self._cache.get(self.key)
            if token is not None:
                self._cache.discard(self.key, token)
            self._failure = None
            self._failures = 0
            self._wake.set()

    @property
    def failure(self) -> ExchangeError | None:
        """The last exchange's failure, or None when the last exchange succeeded."""
        return self._failure

    def current(self) -> SessionToken | None:
        return self._cache.get(self.key)

    def start(self) -> None:
        """Start the renewal loop (idempotent); the first exchange begins at once."""
        if self._task is None:
            self._next_outcome = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(), name=f"tokens {self.key}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def get(self) -> SessionToken:
        """The current token; waits only when there is none and no backoff is running.

        Raises TokenUnavailable while backing off after a failed exchange.
        """
        token = self._cache.get(self.key)
        if token is not None:
            return token
        self.start()
        self._raise_if_backing_off()
        if not self._exchanging:
            self._wake.set()
        assert self._next_outcome is not None
        self.waits += 1
        # Shielded: a client that hangs up must not cancel the outcome others wait for.
        await asyncio.shield(self._next_outcome)
        token = self._cache.get(self.key)
        if token is not None:
            return token
        self._raise_if_backing_off()
        assert self._failure is not None
        raise TokenUnavailable(self._failure, 0.0)

    def invalidate(self, token: SessionToken) -> None:
        """The API refused `token`: drop it if still cached and renew now (unless backing off)."""
        if self._cache.discard(self.key, token):
            log.info(
                "session token for %s was refused by the API; renewing",
                self._label(),
                extra={"fields": self._fields("refused")},
            )
            if self._failure is None:
                self._wake.set()

    def _label(self) -> str:
        credential, organization = self.key
        routes = ", ".join(self.routes) or "-"
        return f"route(s) {routes} (credential '{credential}'" + (
            f", sub-organization {organization})" if organization else ")"
        )

    def _fields(self, outcome: str) -> dict[str, str]:
        return {"routes": ",".join(self.routes), "credential": self.key[0], "outcome": outcome}

    def _raise_if_backing_off(self) -> None:
        if self._failure is not None:
            wait = self._retry_at - self._clock()
            if wait > 0:
                raise TokenUnavailable(self._failure, wait)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            delay = await self._attempt()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, delay)):
                    await self._wake.wait()

    async def _attempt(self) -> float:
        """One exchange; returns how long to sleep before the next one."""
        self._exchanging = True
        self.exchanges += 1
        try:
            token = await self._exchanger.exchange()
        except ExchangeError as err:
            self.outcomes[err.kind] += 1
            return self._failed(err)
        except Exception as err:  # noqa: BLE001 - a bug must not stop renewal for good
            self.outcomes["auth_error"] += 1
            log.error("unexpected error while exchanging for %s: %r", self._label(), err)
            return self._failed(
                ExchangeError("auth_error", f"unexpected error: {type(err).__name__}")
            )
        finally:
            self._exchanging = False
            self._publish()
        self.outcomes["ok"] += 1
        self._failures = 0
        self._failure = None
        self._cache.put(self.key, token)
        log.info(
            "obtained session token for %s (organization %s, expires in %.0f s)",
            self._label(),
            token.organization_id or "unknown",
            token.expires_at - self._clock(),
            extra={"fields": self._fields("ok")},
        )
        return token.refresh_at - self._clock()

    def _failed(self, err: ExchangeError) -> float:
        self._failures += 1
        self._failure = err
        delay = self._retry.delay(self._failures)
        self._retry_at = self._clock() + delay
        log.warning(
            "token exchange for %s failed (%s): %s; retrying in %.1f s",
            self._label(),
            err.kind,
            err,
            delay,
            extra={"fields": self._fields(err.kind)},
        )
        return delay

    def _publish(self) -> None:
        """Wake everyone waiting for this attempt's outcome."""
        done, self._next_outcome = self._next_outcome, asyncio.get_running_loop().create_future()
        if done is not None and not done.done():
            done.set_result(None)


def _label(key: TokenKey) -> str:
    credential, organization = key
    return f"credential '{credential}'" + (
        f" / sub-organization {organization}" if organization else ""
    )


class TokenSources:
    """Every TokenSource of the process, one per (credential, organization) pair."""

    def __init__(
        self, make: Callable[[TokenKey], Exchanger], retry: RetryPolicy, clock: Clock = time.time
    ) -> None:
        self._make = make
        self._retry = retry
        self._clock = clock
        self._cache = TokenCache(clock)
        self._sources: dict[TokenKey, TokenSource] = {}

    def for_key(self, key: TokenKey) -> TokenSource:
        if key not in self._sources:
            self._sources[key] = TokenSource(
                key, self._make(key), self._cache, self._retry, self._clock
            )
        return self._sources[key]

    def __iter__(self) -> Iterator[TokenSource]:
        return iter(self._sources.values())

    async def close(self) -> None:
        for source in self._sources.values():
            await source.close()
