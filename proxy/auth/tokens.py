"""The token cache and the renewal loop: when to exchange, never how.

One `TokenSource` per (credential, organization) pair. It runs one background loop with
explicit states (exchanging, holding a token until renewal is due, backing off after a
failure), in the manner of Vault Proxy's auth handler. The request path only reads: it takes
the cached token, or waits a bounded time for the loop's next outcome when there is none.

Under faults: a request never waits longer than `tokens.wait_timeout`; while a route has no
token its backoff stays short and a request may bring the next attempt forward, so a route
recovers within seconds of the auth host's return; a 401 renews at most once per
`tokens.min_renew_interval`; a reloaded key must prove itself before the token it replaces
is given up, and a reloaded key the auth host rejects leaves the previous key in service
(readiness says `reload_failed`) until a reload brings one that works.

A hung auth host is met by hedging, not by a short deadline. While a route holds no valid
token, an exchange that has had no answer for `tokens.hedge_after` (1 s) gets a fresh one
started beside it, on a new connection, and again each `hedge_after`; the first answer wins
and the others are cancelled. A route is then back within about `hedge_after` of the auth
host answering again, however the old exchange hangs (connect, first byte, or mid-body).
A connect or first-byte deadline short enough for that (under 2 s) would also cut an auth
host that is merely slow, which would then never give a token; hedging keeps the slow
attempt running to `exchange_timeout`. Its cost is bounded: only while requests are failing
for want of a token, at most one new attempt per `hedge_after`, each ended by
`exchange_timeout` (so at most exchange_timeout / hedge_after in flight: 10 by default).
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

# Failures that are the key's own fault (the auth host's verdict on it, or its file cannot
# be read), not the auth host's health: a new key failing so leaves the previous in service.
KEY_FAULTS: Final = frozenset(
    {"key_rejected", "bad_request", "wrong_organization", "secret_unavailable"}
)

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
    # Without a token, an exchange unanswered for this long gets another beside it.
    hedge_after: float = 1.0

    @classmethod
    def from_settings(cls, tokens: TokenSettings) -> TokenPolicy:
        return cls(
            retry=RetryPolicy(tokens.retry_initial, tokens.retry_max),
            retry_max_without_token=tokens.retry_max_without_token,
            wait_timeout=tokens.wait_timeout,
            min_renew_interval=tokens.min_renew_interval,
            hedge_after=tokens.hedge_after,
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
        # The auth host's Retry-After: no attempt at all before this time.
        self._not_before = float("-inf")
        self._exchanging = False
        # When the last attempt began (request-triggered attempts are spaced from it), and
        # when a 401 last dropped the token.
        self._attempted_at = float("-inf")
        self._refused_at = float("-inf")
        # The last key that gave a token, pinned to its value (a secret file may have been
        # rewritten since): it stays in service while the configured key is one the auth
        # host refused, known by `_refused`, its fingerprint ("" when it could not be read).
        self._proven: Exchanger | None = None
        self._refused: str | None = None
        # Why a configured key other than the one in service has not given a token.
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

    def next_outcome(self) -> asyncio.Future[None]:
        """The outcome of the exchange under way, or of the next one, for `run`, which waits
        for every route's first token without being a request. Taken when called, not when
        first awaited: an outcome that lands in between must not be missed (the waiter
        would sleep until the next exchange, hours later). Cancelling it cancels nothing."""
        self.start()
        outcome = self._next_outcome
        assert outcome is not None
        return asyncio.shield(outcome)

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
        tried at once, and the key in service stays until the new one has given a token
        (tried again with backoff while the auth host cannot say). If the auth host refuses
        the new key, the previous key goes on renewing the route's token, the refusal is
        logged as an error and kept in `reload_failure` for readiness, until a reload (or a
        rewritten secret file) brings a key that works."""
        self._exchanger = exchanger
        self._refused = None
        name = self.key[0]
        if self._proven is not None and _fingerprint(exchanger) == _fingerprint(self._proven):
            self._reload_failure = None
            log.info("reload: credential '%s' unchanged", name)
            return
        log.info(
            "reload: credential '%s' changed; renewing its token (the running one serves until "
            "the new key has given a token)",
            name,
        )
        self._reload_failure = None
        self._failures = 0
        if self._task is not None:
            # Also while an exchange is in flight: it uses the old key, so go again after it.
            self._wake.set()

    def _may_attempt_now(self) -> bool:
        now = self._clock()
        return now - self._attempted_at >= REQUEST_ATTEMPT_INTERVAL and now >= self._not_before

    def _next_chance(self) -> float:
        """Seconds until an attempt may give this route a token."""
        now = self._clock()
        soonest = min(self._retry_at, self._attempted_at + REQUEST_ATTEMPT_INTERVAL)
        return max(0.0, soonest - now, self._not_before - now)

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
            # Whatever woke it (a 401, a reload), the auth host's Retry-After stands.
            if (rate_limited := self._not_before - self._clock()) > 0:
                await asyncio.sleep(rate_limited)

    async def _attempt(self) -> float:
        """One exchange (hedged while the route has no token); returns how long to sleep
        before the next one."""
        self._exchanging = True
        self._attempted_at = self._clock()
        exchanger = self._key_to_use()
        try:
            token = await self._hedged(exchanger)
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
        previous, self._proven = self._proven, exchanger
        if exchanger is not previous:
            self._refused = None
            self._reload_failure = None
            if previous is not None and token.key_fingerprint != _fingerprint(previous):
                log.info("reload: the new key for %s works; its token now serves", self._label())
        log.info(
            "obtained session token for %s (organization %s, expires in %.0f s)",
            self._label(),
            token.organization_id or "unknown",
            token.expires_at - self._clock(),
            extra={"fields": self._fields("ok")},
        )
        return token.refresh_at - self._clock()

    def _key_to_use(self) -> Exchanger:
        """The configured key, pinned to its value now; or, while that is the key the auth
        host refused, the last key that worked."""
        if self._proven is not None and self._refused is not None:
            if _fingerprint(self._exchanger) == self._refused:
                return self._proven
        return self._exchanger.pinned()

    async def _hedged(self, exchanger: Exchanger) -> SessionToken:
        """An exchange; while the route holds no token, one more beside those in flight
        each `hedge_after` that none has answered. The first answer wins (a token before a
        failure that came with it); the rest are cancelled."""
        attempts: set[asyncio.Task[SessionToken]] = set()
        try:
            while True:
                if not attempts or self._cache.get(self.key) is None:
                    self.exchanges += 1
                    attempts.add(asyncio.ensure_future(exchanger.exchange()))
                done, attempts = await asyncio.wait(
                    attempts, timeout=self._policy.hedge_after, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    answers = sorted(done, key=lambda attempt: attempt.exception() is not None)
                    return answers[0].result()
        finally:
            for attempt in attempts:
                attempt.cancel()

    def _failed(self, err: ExchangeError, exchanger: Exchanger) -> float:
        held = self._cache.get(self.key)
        now = self._clock()
        proven = self._proven
        if proven is not None and _fingerprint(exchanger) != _fingerprint(proven):
            # A key other than the one in service (reloaded, or its file rewritten) failed.
            first = self._reload_failure is None
            self._reload_failure = err
            if err.kind in KEY_FAULTS:
                # Refused: the key in service goes on; a token is wanted now if none is held.
                self._refused = _fingerprint(self._exchanger)
                log.error(
                    "reload: the new key for %s was refused (%s): %s; the previous key stays "
                    "in service until a reload brings a key that works",
                    self._label(),
                    err.kind,
                    err,
                    extra={"fields": self._fields(err.kind)},
                )
                delay = 0.0 if held is None else max(0.0, held.refresh_at - now)
                self._retry_at = now + delay
                return delay
            if first:
                log.error(
                    "reload: the new key for %s did not give a token yet (%s): %s; the "
                    "previous token serves meanwhile",
                    self._label(),
                    err.kind,
                    err,
                    extra={"fields": self._fields(err.kind)},
                )
        self._failures += 1
        self._failure = err
        if held is None:
            # Requests are failing: keep the next attempt close, however long the outage was.
            delay = self._policy.retry.delay(self._failures, self._policy.retry_max_without_token)
        else:
            # The token still serves, but try again no later than when it stops being usable.
            delay = min(self._policy.retry.delay(self._failures), held.usable_until - now)
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)
            self._not_before = now + err.retry_after
        self._retry_at = now + delay
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


def _fingerprint(exchanger: Exchanger) -> str:
    """The fingerprint of the key an exchange would send now; "" when it cannot be read."""
    try:
        return exchanger.key_fingerprint()
    except SecretUnavailable:
        return ""
