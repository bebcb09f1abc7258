"""The token lifecycle, point by point: lifetime, refresh ahead, single flight, failures and
backoff, upstream 401s. Short token lifetimes keep it fast; nothing sleeps for long."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
from typing import Any

import aiohttp
import pytest

from proxy.auth.exchange import Exchanger, SessionToken, renewal_margin
from proxy.auth.tokens import RetryPolicy
from proxy.config.load import load_settings
from proxy.serve.app import connect
from proxy.serve.server import start
from tests.standin import StandIn

from .conftest import StartProxy, WriteConfig
from .support import eventually, request

# -- 1. lifetime ------------------------------------------------------------------------


def test_renewal_margin_is_five_minutes_or_a_fifth_of_the_lifetime() -> None:
    """renewal_margin() is five minutes or a fifth of the token's lifetime, whichever is smaller,
    or the configured margin, but never more than half the lifetime."""
    assert renewal_margin(3600, None) == 300
    assert renewal_margin(600, None) == 120
    assert renewal_margin(3600, 60) == 60
    assert renewal_margin(100, 90) == 50  # never more than half the lifetime


async def test_lifetime_comes_from_exp_or_expires_in_whichever_is_earlier(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """A token's expiry is the JWT's exp or the reply's expires_in, whichever is earlier, and its
    refresh time is set by the renewal margin of that lifetime."""
    standin.token_lifetime = 1000
    settings = load_settings(write_config())
    async with connect(settings) as upstream:
        (route,) = upstream.routes
        before = time.time()
        token = await route.tokens.get()
        assert before + 1000 - 1 <= token.expires_at <= time.time() + 1000
        assert token.refresh_at == pytest.approx(token.expires_at - 200, abs=0.01)

    standin.send_expires_in = True  # expires_in = half the JWT's lifetime: it wins
    async with connect(settings) as upstream:
        (route,) = upstream.routes
        token = await route.tokens.get()
        assert token.expires_at <= time.time() + 500
        assert token.refresh_at == pytest.approx(token.expires_at - 100, abs=0.01)


async def test_configured_refresh_margin_is_used(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """tokens.refresh_margin, when set, is how long before expiry the token is renewed."""
    settings = load_settings(write_config(tokens={"refresh_margin": 42}))
    async with connect(settings) as upstream:
        (route,) = upstream.routes
        token = await route.tokens.get()
        assert token.refresh_at == pytest.approx(token.expires_at - 42, abs=0.01)


# -- 2. refresh ahead -------------------------------------------------------------------


async def test_renewal_runs_in_background_so_requests_never_wait_for_it(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Renewal ahead of expiry runs in the background: while it is held, requests are served at
    once with the old token, and afterwards with the new one, never a rejected one."""
    standin.token_lifetime = 1.0  # renewal due 0.2 s before expiry
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    first_token = standin.api_requests[-1].token_id

    standin.gate = asyncio.Event()  # the next exchange hangs until released
    await eventually(lambda: standin.exchanges_started == 2)
    # The renewal is in flight and held: a request must still be served, with the old token.
    reply = await asyncio.wait_for(request(http, "GET", f"{proxy}/x"), timeout=0.5)
    assert reply.status == 200
    assert standin.api_requests[-1].token_id == first_token

    standin.gate.set()
    await eventually(lambda: len(standin.exchanges) == 2)
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    assert standin.api_requests[-1].token_id != first_token
    assert standin.rejected_tokens == []


async def test_after_a_suspend_past_expiry_the_next_request_renews_at_once(
    standin: StandIn, write_config: WriteConfig, http: aiohttp.ClientSession
) -> None:
    """After the wall clock jumps past a token's expiry (a laptop waking up), the next request
    renews at once instead of waiting for the monotonic timer, and the expired token is never
    sent."""
    # Wall-clock time jumps (a laptop wakes up) while the renewal timer, on the monotonic
    # clock, is still far off: the request must not wait for that timer.
    jump = [0.0]

    def clock() -> float:
        return time.time() + jump[0]

    standin.clock = clock
    running = await start(load_settings(write_config()), clock)
    try:
        (proxy,) = running.urls
        assert (await request(http, "GET", f"{proxy}/x")).status == 200
        first = standin.api_requests[-1].token_id
        jump[0] = 2 * 3600.0  # two hours later: the hour-long token has expired
        reply = await asyncio.wait_for(request(http, "GET", f"{proxy}/x"), timeout=2)
        assert reply.status == 200
        assert standin.api_requests[-1].token_id != first
        assert standin.rejected_tokens == []  # the expired token never went out
    finally:
        await running.stop()


# -- 3. single flight -------------------------------------------------------------------


async def test_concurrent_cold_requests_share_one_exchange(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Fifty requests arriving with no token share a single exchange and all get 200: single
    flight, no stampede on the auth host."""
    proxy = await start_proxy()
    standin.gate = asyncio.Event()
    requests = [asyncio.create_task(request(http, "GET", f"{proxy}/r/{i}")) for i in range(50)]
    await eventually(lambda: standin.exchanges_started == 1)
    await asyncio.sleep(0.05)  # give the other 49 the chance to start a second exchange
    standin.gate.set()
    statuses = [reply.status for reply in await asyncio.gather(*requests)]
    assert statuses == [200] * 50
    assert standin.exchanges_started == 1


# -- 4. failures ------------------------------------------------------------------------


async def test_auth_host_error_gives_503_with_retry_after_and_a_json_reason(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """An auth host answering 503 gives the client 503 auth_error with Retry-After and a JSON
    body naming the route, the credential and the HTTP status, and nothing reaches the API."""
    standin.always = 503
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 503
    assert int(reply.headers["Retry-After"]) >= 1
    body = reply.json()
    assert body["error"] == "auth_error"
    assert body["route"] == "default"
    assert body["credential"] == "main"
    assert "HTTP 503" in body["detail"]
    assert standin.api_requests == []


@pytest.mark.parametrize("reply", ["not-json", "no-token", "not-jwt", "expired", "no-exp"])
async def test_unusable_auth_reply_is_a_failed_exchange(
    reply: Any, start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """An auth reply that is not JSON, has no token, is not a JWT, is already expired or has no
    exp is a failed exchange: 503 bad_reply, and nothing reaches the API."""
    standin.always = reply
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 503
    assert reply.json()["error"] == "bad_reply"
    assert standin.api_requests == []


async def test_rejected_key_says_so_and_what_to_check(
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key the auth host rejects gives 503 key_rejected whose detail names the variable to
    check ($TEST_APPCIRCLE_KEY) but never the key itself."""
    monkeypatch.setenv("TEST_APPCIRCLE_KEY", "pak_revoked_key_value")
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 503
    body = reply.json()
    assert body["error"] == "key_rejected"
    assert "rejected" in body["detail"]
    assert "$TEST_APPCIRCLE_KEY" in body["detail"]
    assert "pak_revoked_key_value" not in str(body)


async def test_auth_host_down_gives_503(
    start_proxy: StartProxy, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    """An auth host nobody listens for gives 503 auth_unreachable."""
    proxy = await start_proxy(appcircle={"auth_url": f"http://127.0.0.1:{unused_tcp_port}"})
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 503
    assert reply.json()["error"] == "auth_unreachable"


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    """RetryPolicy's delay doubles per failure up to retry_max, with jitter between half and the
    full delay, and stays at the cap however many failures."""
    low = RetryPolicy(1.0, 8.0, random=lambda: 0.0)
    high = RetryPolicy(1.0, 8.0, random=lambda: 1.0)
    assert [low.delay(n) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]
    assert [high.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    assert high.delay(10_000) == 8


async def test_backoff_starts_at_retry_initial_again_after_each_success(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Backoff starts from tokens.retry_initial on a first failure and again after each success,
    so Retry-After stays within it rather than carrying an old streak."""
    backoff = {"retry_initial": 2.0, "retry_max": 8.0}  # first retry due in 1 to 2 s
    standin.script = [500]
    cold = await start_proxy(tokens=backoff)
    reply = await request(http, "GET", f"{cold}/x")
    assert reply.status == 503 and int(reply.headers["Retry-After"]) <= 2

    warm = await start_proxy(tokens=backoff)
    assert (await request(http, "GET", f"{warm}/x")).status == 200
    standin.always = 500
    standin.revoke_all()  # the 401 drops the token; its renewal is the first failure
    reply = await request(http, "GET", f"{warm}/x")
    assert reply.status == 503 and int(reply.headers["Retry-After"]) <= 2


async def test_a_failed_renewal_is_retried_before_the_token_it_would_replace_runs_out(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A failed renewal is retried before the current token stops being usable, even when
    tokens.retry_initial is far longer, so the route never goes without a token."""
    standin.token_lifetime = 2.0  # renewal due at 1.6 s, the token usable until 1.9 s
    proxy = await start_proxy(tokens={"retry_initial": 30.0, "retry_max": 60.0})
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    standin.script = [500]  # the renewal fails once
    # A 30 s backoff would outlive the token: the retry comes before it runs out instead.
    await eventually(lambda: len(standin.exchanges) == 3, within=3)
    assert [exchange.status for exchange in standin.exchanges] == [200, 500, 200]
    assert (await request(http, "GET", f"{proxy}/x")).status == 200


async def test_failing_exchanges_are_retried_with_backoff_not_hammered(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """While the auth host fails, a busy client causes only a handful of exchanges a second (3 to
    15), not one per request."""
    standin.always = 500
    proxy = await start_proxy()  # retries start at 0.05 s, capped at 0.2 s
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        assert (await request(http, "GET", f"{proxy}/x")).status == 503
        await asyncio.sleep(0.01)
    # Without backoff a busy client would cause ~one exchange per request (~80 here).
    assert 3 <= len(standin.exchanges) <= 15


async def test_a_429_from_the_auth_host_holds_every_attempt_until_its_retry_after(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Guards issue 18, point 4: a rate-limited auth host (429, Retry-After: 1) is not
    asked again before a second has passed, however busy the clients (the backoff alone
    would retry after 0.05 s, and requests bring attempts forward every 0.5 s); the
    answer meanwhile says rate_limited and when to come back."""
    standin.script = [429]
    standin.retry_after = "1"
    proxy = await start_proxy()
    started = time.monotonic()
    first = await request(http, "GET", f"{proxy}/x")
    assert first.status == 503
    assert first.json()["error"] == "rate_limited"
    assert "Retry-After" in first.json()["detail"]
    assert int(first.headers["Retry-After"]) >= 1
    while time.monotonic() - started < 0.8:
        assert (await request(http, "GET", f"{proxy}/x")).status == 503
        await asyncio.sleep(0.02)
    assert len(standin.exchanges) == 1

    async def served() -> bool:
        return (await request(http, "GET", f"{proxy}/x")).status == 200

    await eventually(served)
    assert time.monotonic() - started >= 1.0
    assert len(standin.exchanges) == 2


async def test_route_recovers_once_the_auth_host_does(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """After two failed exchanges the route recovers on its own once the auth host answers again."""
    standin.script = [500, 500]
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 503

    async def served() -> bool:
        return (await request(http, "GET", f"{proxy}/x")).status == 200

    await eventually(served)
    assert len(standin.exchanges) == 3


async def test_valid_old_token_is_used_while_renewal_fails_and_expired_one_never(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """While renewal fails, the still-valid old token keeps serving; once it expires requests get
    503, and the API never sees the expired token."""
    standin.token_lifetime = 1.0
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    standin.always = 500
    await eventually(lambda: len(standin.exchanges) >= 2)  # renewal has failed
    assert (await request(http, "GET", f"{proxy}/x")).status == 200  # the old token still serves

    async def refused_once_expired() -> bool:
        status = (await request(http, "GET", f"{proxy}/x")).status
        if status == 200:
            return False
        assert status == 503
        return True

    await eventually(refused_once_expired)
    # The API never saw an expired token: it would have answered 401.
    assert standin.rejected_tokens == []


async def test_a_request_arriving_while_a_retry_is_in_flight_waits_for_its_outcome(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A request arriving while a retry exchange is in flight waits for its outcome and gets 200,
    rather than failing at once on the previous failure."""
    standin.script = [500]
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 503
    standin.gate = asyncio.Event()  # the retry, once it starts, is held
    await eventually(lambda: standin.exchanges_started == 2)
    waiting = asyncio.create_task(request(http, "GET", f"{proxy}/x"))
    await asyncio.sleep(0.1)
    assert not waiting.done(), "a request failed while the retry that could serve it ran"
    standin.gate.set()
    assert (await asyncio.wait_for(waiting, 2)).status == 200


async def test_a_bug_in_an_exchange_fails_requests_cleanly_and_renewal_goes_on(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception in an exchange gives 503 auth_error naming its type, is logged and
    counted as auth_error, and the renewal loop survives to serve later requests."""
    exchange = Exchanger.exchange
    calls: list[None] = []

    async def failing_once(self: Exchanger) -> SessionToken:
        calls.append(None)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return await exchange(self)

    monkeypatch.setattr(Exchanger, "exchange", failing_once)
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 503
    assert reply.json()["error"] == "auth_error"
    assert "unexpected error: RuntimeError" in reply.json()["detail"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("RuntimeError" in line and "route(s) default" in line for line in errors)

    async def served() -> bool:
        return (await request(http, "GET", f"{proxy}/x")).status == 200

    await eventually(served)  # the renewal loop survived the bug
    metrics = (await request(http, "GET", f"{proxy}/_proxy/metrics")).body.decode()
    counted = 'appcircle_proxy_token_exchanges_total{outcome="auth_error",route="default"} 1.0'
    assert counted in metrics.splitlines()


# -- 5. upstream 401 --------------------------------------------------------------------


async def test_upstream_401_renews_the_token_and_retries_once(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """An API 401 on a revoked token renews the token and replays the request once, so the client
    gets 200 for the same path."""
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    standin.revoke_all()
    reply = await request(http, "GET", f"{proxy}/after/revocation")
    assert reply.status == 200
    assert reply.json()["raw_path"] == "/after/revocation"
    assert len(standin.exchanges) == 2
    assert standin.rejected_tokens == ["InvalidTokenError"]


async def test_small_body_is_replayed_after_a_401(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A small POST body is kept and replayed intact (same SHA-256) after the API's 401 and a
    renewal."""
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    standin.revoke_all()
    payload = b'{"name": "profile"}' * 100
    reply = await request(http, "POST", f"{proxy}/build/v2/profiles", data=payload)
    assert reply.status == 200
    assert reply.json()["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_large_body_is_not_replayed_the_401_goes_back_and_the_token_is_renewed(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A body larger than tokens.replay_limit is not replayed: the client gets the API's 401, but
    the token is still renewed so the next request gets 200."""
    proxy = await start_proxy(tokens={"replay_limit": 1024})
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    standin.revoke_all()
    reply = await request(http, "POST", f"{proxy}/upload", data=io.BytesIO(b"z" * 4096))
    assert reply.status == 401
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    assert len(standin.exchanges) == 2


async def test_concurrent_401s_cause_one_renewal(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Twenty concurrent requests refused 401 on a revoked token cause a single renewal, and all
    get 200."""
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    standin.revoke_all()
    replies = await asyncio.gather(*(request(http, "GET", f"{proxy}/x/{i}") for i in range(20)))
    assert [reply.status for reply in replies] == [200] * 20
    assert len(standin.exchanges) == 2


async def test_a_401_with_a_fresh_token_goes_back_to_the_client(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A 401 the API gives even to a fresh token goes back to the client after one renewal and
    one replay, with no renewal loop."""
    proxy = await start_proxy()
    # The API refuses even brand-new tokens (say, a user without rights): one retry, no loop.
    assert (await request(http, "GET", f"{proxy}/_test/status/401")).status == 401
    assert len(standin.exchanges) == 2
