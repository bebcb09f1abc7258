"""The token cache and the renewal loop: when to exchange, never how.

One `TokenSource` per (credential, organization) pair. It runs one background loop with
explicit states (exchanging, holding a token until renewal is due, backing off after a
failure), in the manner of Vault Proxy's auth handler. The request path only reads: it takes
the cached token, or waits a bounded time for the loop's next outcome when there is none.

Under faults: a request never waits longer than `tokens.wait_timeout`; while a route has no
token its backoff stays short and a request may bring the next attempt forward, so a route
recovers within seconds of the auth host's return; a 401 renews at most once per
`tokens.min_renew_interval`; a reloaded key must prove itself before the token it replaces
is given up.
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
from typing import Final

from cachetools import TLRUCache

from ..config.settings import TokenSettings
from .credentials import SecretUnavailable
from .exchange import ExchangeError, Exchanger, SessionToken

__all__ = [
    "Clock",
    "RetryPolicy",
    "TokenCache",
    "TokenKey",
    "TokenPolicy",
    "TokenSource",
    "TokenSources",
    "TokenUnavailable",
]

log = logging.getLogger("appcircle_proxy.tokens")

Clock = Callable[[], float]
TokenKey = tuple[str, str | None]  # (credential name, sub-organization id or None for its own)

# A request on a route with no token brings the next attempt forward, but never sooner than
# this after the last one began: a flood of requests must not hammer a dead auth host.
REQUEST_ATTEMPT_INTERVAL: Final = 0.5


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

    def delay(self, failures: int, cap: float | None = None) -> float:
        """The wait before attempt `failures + 1`; `cap` lowers the maximum for this one."""
        maximum = self.maximum if cap is None else min(self.maximum, cap)
        ceiling = min(maximum, self.initial * 2.0 ** min(failures - 1, 62))
        # Half fixed, half random: never sooner than half the step, so a dead auth host is
        # not hammered, and proxies that failed together do not retry in lockstep.
        return ceiling * (0.5 + self.random() / 2)


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """The timing rules every TokenSource follows, from `[tokens]`."""

    retry: RetryPolicy
    # The backoff's ceiling while the route holds no valid token (requests are failing).
    retry_max_without_token: float
    # The longest a request waits for an exchange before it gets its 503.
    wait_timeout: float
    # A 401 from the API drops the route's token at most this often.
    min_renew_interval: float

    @classmethod
    def from_settings(cls, tokens: TokenSettings) -> TokenPolicy:
        return cls(
            retry=RetryPolicy(tokens.retry_initial, tokens.retry_max),
            retry_max_without_token=tokens.retry_max_without_token,
            wait_timeout=tokens.wait_timeout,
            min_renew_interval=tokens.min_renew_interval,
        )


class TokenCache:
    """Tokens by key; an entry vanishes by itself once its token is no longer usable."""

    def __init__(self, clock: Clock, maxsize: int = 1024) -> None:
        self._entries: TLRUCache[TokenKey, SessionToken] = TLRUCache(
            maxsize, ttu=lambda _key, token, _now: token.usable_until, timer=clock
        )

    def get(self, key: TokenKey) -> SessionToken | None:
        # Indexing, not .get(): one expiry check instead of two (once per request).
        try:
            return self._entries[key]
        except KeyError:
            return None

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
        policy: TokenPolicy,
        clock: Clock,
    ) -> None:
        self.key = key
        self._exchanger = exchanger
        self._cache = cache
        self._policy = policy
        self._clock = clock
        self._failures = 0
        self._failure: ExchangeError | None = None
        self._retry_at = 0.0
        self._exchanging = False
        # When the last attempt began (request-triggered attempts are spaced from it), and
        # when a 401 last dropped the token.
        self._attempted_at = float("-inf")
        self._refused_at = float("-inf")
        # A reloaded key whose first exchange has not succeeded yet, and why it failed.
        self._reload_pending = False
        self._reload_failure: ExchangeError | None = None
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

    @property
    def failure(self) -> ExchangeError | None:
        """The last exchange's failure, or None when the last exchange succeeded."""
        return self._failure

    @property
    def reload_failure(self) -> ExchangeError | None:
        """Why the key taken up by the last reload has not yet given a token, or None."""
        return self._reload_failure

    def current(self) -> SessionToken | None:
        return self._cache.get(self.key)

    def start(self) -> None:
        """Start the renewal loop (idempotent); the first exchange begins at once."""
        if self._task is None:
            self._next_outcome = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(), name=f"tokens {self.key}")

    async def next_outcome(self) -> None:
        """Wait for the outcome of the exchange under way, or of the next one: for `run`,
        which waits for every route's first token without being a request."""
        self.start()
        outcome = self._next_outcome
        assert outcome is not None
        await asyncio.shield(outcome)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def get(self) -> SessionToken:
        """The current token; without one, waits at most `wait_timeout` for an exchange.

        Raises TokenUnavailable when none comes in time, or at once while backing off with
        an attempt made less than REQUEST_ATTEMPT_INTERVAL ago.
        """
        token = self._cache.get(self.key)
        if token is not None:
            return token
        self.start()
        if not self._exchanging:
            if self._failure is not None and not self._may_attempt_now():
                raise TokenUnavailable(self._failure, self._next_chance())
            self._wake.set()
        outcome = self._next_outcome
        assert outcome is not None
        self.waits += 1
        try:
            async with asyncio.timeout(self._policy.wait_timeout):
                # Shielded: a request that gives up must not cancel the outcome others await.
                await asyncio.shield(outcome)
        except TimeoutError:
            raise TokenUnavailable(self._wait_timed_out(), self._next_chance()) from None
        token = self._cache.get(self.key)
        if token is not None:
            return token
        assert self._failure is not None
        raise TokenUnavailable(self._failure, self._next_chance())

    async def fresh(self, taken: SessionToken) -> SessionToken:
        """The token to send now in place of `taken`, got earlier from `get()`.

        For the request path to call right before the request goes upstream, after any wait
        for a connection: `taken` comes back while it is before its renewal time; otherwise
        the renewed token replaces it as soon as there is one; a token past usable is never
        returned (waits as `get()` does; raises TokenUnavailable).
        """
        return self.to_send() or await self.get()

    def to_send(self) -> SessionToken | None:
        """The token to send now, without waiting; None when there is none (then `get()`).

        A token within its refresh margin is still usable (the cache would not hold it
        otherwise), so it is sent, and a renewal is made sure of: the renewal loop's timer
        may have overslept, as after a laptop's suspension, which it does not count.
        """
        token = self._cache.get(self.key)
        if token is not None and self._clock() >= token.refresh_at:
            self._renew_if_idle()
        return token

    def invalidate(self, token: SessionToken) -> bool:
        """The API refused `token` with a 401. True when a replay is worth it: `get()` now
        gives (or is obtaining) another token. False when `token` stays, because a 401 already
        renewed this route less than `min_renew_interval` ago: the 401 is the API's answer."""
        if self._cache.get(self.key) is not token:
            return True
        now = self._clock()
        if now - self._refused_at < self._policy.min_renew_interval:
            return False
        self._refused_at = now
        self._cache.discard(self.key, token)
        log.info(
            "session token for %s was refused by the API; renewing",
            self._label(),
            extra={"fields": self._fields("refused")},
        )
        self._renew_if_idle()
        return True

    def stage(self, exchanger: Exchanger) -> None:
        """Take up a reloaded credential. An unchanged key changes nothing. A changed one is
        used from now on, but the running token keeps serving until the new key's exchange
        succeeds (at once, then retried with backoff); a failure is logged as an error and
        kept in `reload_failure` for readiness, and the old token serves until it expires."""
        token = self._cache.get(self.key)
        try:
            unchanged = token is not None and exchanger.key_fingerprint() == token.key_fingerprint
        except SecretUnavailable:
            unchanged = False  # the exchange below fails and says why
        self._exchanger = exchanger
        name = self.key[0]
        if unchanged:
            log.info("reload: credential '%s' unchanged", name)
            return
        log.info(
            "reload: credential '%s' changed; renewing its token (the running one serves until "
            "the new key has given a token)",
            name,
        )
        self._reload_pending = token is not None
        self._reload_failure = None
        self._failures = 0
        if self._task is not None:
            # Also while an exchange is in flight: it uses the old key, so go again after it.
            self._wake.set()

    def _may_attempt_now(self) -> bool:
        return self._clock() - self._attempted_at >= REQUEST_ATTEMPT_INTERVAL

    def _next_chance(self) -> float:
        """Seconds until an attempt may give this route a token."""
        now = self._clock()
        return max(0.0, min(self._retry_at, self._attempted_at + REQUEST_ATTEMPT_INTERVAL) - now)

    def _renew_if_idle(self) -> None:
        if self._task is not None and not self._exchanging and self._failure is None:
            self._wake.set()

    def _wait_timed_out(self) -> ExchangeError:
        return ExchangeError(
            "auth_unreachable",
            f"the auth host {self._exchanger.auth_url} has not answered within "
            f"tokens.wait_timeout ({self._policy.wait_timeout:g} s); still trying",
        )

    def _label(self) -> str:
        credential, organization = self.key
        routes = ", ".join(self.routes) or "-"
        return f"route(s) {routes} (credential '{credential}'" + (
            f", sub-organization {organization})" if organization else ")"
        )

    def _fields(self, outcome: str) -> dict[str, str]:
        return {"routes": ",".join(self.routes), "credential": self.key[0], "outcome": outcome}

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
        self._attempted_at = self._clock()
        self.exchanges += 1
        exchanger = self._exchanger
        try:
            token = await exchanger.exchange()
        except ExchangeError as err:
            self.outcomes[err.kind] += 1
            return self._failed(err, exchanger)
        except Exception as err:  # noqa: BLE001 - a bug must not stop renewal for good
            self.outcomes["auth_error"] += 1
            # The type only: an exception's text may quote the form, and so the key.
            log.error(
                "unexpected %s while exchanging for %s; retrying",
                type(err).__name__,
                self._label(),
            )
            return self._failed(
                ExchangeError("auth_error", f"unexpected error: {type(err).__name__}"), exchanger
            )
        finally:
            self._exchanging = False
            self._publish()
        self.outcomes["ok"] += 1
        self._failures = 0
        self._failure = None
        self._cache.put(self.key, token)
        if exchanger is self._exchanger and self._reload_pending:
            self._reload_pending = False
            log.info("reload: the new key for %s works; its token now serves", self._label())
        if exchanger is self._exchanger:
            self._reload_failure = None
        log.info(
            "obtained session token for %s (organization %s, expires in %.0f s)",
            self._label(),
            token.organization_id or "unknown",
            token.expires_at - self._clock(),
            extra={"fields": self._fields("ok")},
        )
        return token.refresh_at - self._clock()

    def _failed(self, err: ExchangeError, exchanger: Exchanger) -> float:
        self._failures += 1
        self._failure = err
        held = self._cache.get(self.key)
        now = self._clock()
        if held is None:
            # Requests are failing: keep the next attempt close, however long the outage was.
            delay = self._policy.retry.delay(self._failures, self._policy.retry_max_without_token)
        else:
            # The token still serves, but try again no later than when it stops being usable.
            delay = min(self._policy.retry.delay(self._failures), held.usable_until - now)
        self._retry_at = now + delay
        if self._reload_pending and exchanger is self._exchanger:
            first = self._reload_failure is None
            self._reload_failure = err
            if first:
                serving = (
                    f"the previous token serves until it expires in {held.expires_at - now:.0f} s"
                    if held is not None
                    else "the previous token has expired"
                )
                log.error(
                    "reload: the new key for %s did not give a token (%s): %s; %s; "
                    "retrying in %.1f s",
                    self._label(),
                    err.kind,
                    err,
                    serving,
                    delay,
                    extra={"fields": self._fields(err.kind)},
                )
                return delay
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


class TokenSources:
    """Every TokenSource of the process, one per (credential, organization) pair."""

    def __init__(
        self, make: Callable[[TokenKey], Exchanger], policy: TokenPolicy, clock: Clock = time.time
    ) -> None:
        self._make = make
        self._policy = policy
        self._clock = clock
        self._cache = TokenCache(clock)
        self._sources: dict[TokenKey, TokenSource] = {}

    def for_key(self, key: TokenKey) -> TokenSource:
        if key not in self._sources:
            self._sources[key] = TokenSource(
                key, self._make(key), self._cache, self._policy, self._clock
            )
        return self._sources[key]

    def __iter__(self) -> Iterator[TokenSource]:
        return iter(self._sources.values())

    async def close(self) -> None:
        for source in self._sources.values():
            await source.close()
