"""Session tokens over their life and under faults: lifetime, refresh ahead, single
flight, backoff, recovery after an auth-host outage, 401 renewals, reloads."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.auth.exchange import Exchanger, SessionToken, renewal_margin
from proxy.auth.tokens import RetryPolicy, TokenUnavailable
from proxy.config.load import load_settings
from proxy.serve.app import connect
from proxy.serve.server import Running, start
from tests.support.standin import StandIn

from .conftest import (
    INLINE_KEY_CONFIG,
    PERSONAL_KEY,
    PERSONAL_KEY_CONFIG,
    ROOT_ORG,
    SUB_ORG,
    StartProxy,
    WriteConfig,
)
from .support import Reply, eventually, request
from .support.processes import serving


async def timed(http: aiohttp.ClientSession, url: str) -> tuple[Reply, float]:
    """A GET's reply and how long it took to come."""
    started = time.monotonic()
    reply = await request(http, "GET", url)
    return reply, time.monotonic() - started


async def status(http: aiohttp.ClientSession, url: str) -> int:
    return (await request(http, "GET", url)).status


def tokens_issued(standin: StandIn) -> int:
    return sum(1 for exchange in standin.exchanges if exchange.status == 200)


# Retries far apart unless a route without a token, or a request, brings them closer.
SLOW_RETRIES = {"retry_initial": 10, "retry_max": 10, "retry_max_without_token": 10}


async def recovered_within(http: aiohttp.ClientSession, url: str, limit: float) -> float:
    """Seconds until a GET to `url` gets 200, polling; fails once `limit` has passed."""
    back = time.monotonic()
    while await status(http, url) != 200:
        assert time.monotonic() - back <= limit, f"the route was still down after {limit} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - back


async def failed_attempts(http: aiohttp.ClientSession, proxy: str, route: str) -> int:
    """Failed exchanges of `route` so far, as /_proxy/metrics counts them."""
    page = (await request(http, "GET", f"{proxy}/_proxy/metrics")).body.decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in page.splitlines()
        if line.startswith("appcircle_proxy_token_exchanges_total{")
        and f'route="{route}"' in line
        and 'outcome="ok"' not in line
    )


@pytest.fixture
async def running(write_config: WriteConfig, tmp_path: Path) -> AsyncIterator[Running]:
    """A proxy whose key is in the file `tmp_path / "key"`, reloadable as SIGHUP does."""
    (tmp_path / "key").write_text(PERSONAL_KEY)
    credentials = {"main": {"kind": "personal-access-key", "secret_file": str(tmp_path / "key")}}
    proxy = await start(load_settings(write_config(credentials=credentials)))
    yield proxy
    await proxy.stop()


def reload(proxy: Running, tmp_path: Path) -> None:
    """What SIGHUP does: read the configuration again and hand it to the running proxy."""
    proxy.proxy.runtime.reload(load_settings(tmp_path / "config.toml"))


ROTATED_KEY = PERSONAL_KEY + "-rotated"


async def test_a_hung_auth_host_gets_requests_their_503_within_wait_timeout(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """With the auth host hanging, every request waiting for a token gets 503 auth_unreachable
    with Retry-After within tokens.wait_timeout, all sharing one exchange attempt, and service
    resumes once it answers."""
    standin.gate = asyncio.Event()  # every exchange hangs
    proxy = await start_proxy(tokens={"wait_timeout": 0.3, "exchange_timeout": 30})
    answers = await asyncio.wait_for(
        asyncio.gather(*(timed(http, f"{proxy}/x/{i}") for i in range(30))), 3
    )
    for reply, took in answers:
        assert reply.status == 503
        assert int(reply.headers["Retry-After"]) >= 1
        assert reply.json()["error"] == "auth_unreachable"
        assert "wait_timeout" in reply.json()["detail"]
        assert took < 1.0
    assert standin.exchanges_started == 1  # they all waited on the same attempt
    standin.gate.set()
    assert await status(http, f"{proxy}/x") == 200


async def test_a_route_is_back_within_2_s_of_a_hung_auth_host_answering_again(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Issue 17, point 7: an exchange the auth host never answers must not keep the route
    down until exchange_timeout (10 s): a hedged exchange beside it gets the token within
    about tokens.hedge_after of the auth host answering again."""
    hung = asyncio.Event()  # never set: the exchanges held on it never answer
    standin.gate = hung
    proxy = await start_proxy(tokens={"wait_timeout": 0.2})
    assert await status(http, f"{proxy}/x") == 503
    await asyncio.sleep(1.3)
    standin.gate = None  # the auth host answers again; the exchanges it holds stay hung
    assert await recovered_within(http, f"{proxy}/x", 2.0) <= 2.0
    hung.set()


async def test_a_renewal_that_hangs_past_the_tokens_expiry_holds_the_route_at_most_2_s(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Issue 17, point 7: the renewal hangs while the token still serves; once it has
    expired, a hedge starts, so the route is back within 2 s of the auth host answering."""
    standin.token_lifetime = 1.0  # renewal due at 0.8 s, unusable from 0.95 s
    proxy = await start_proxy(tokens={"wait_timeout": 0.2})
    assert await status(http, f"{proxy}/x") == 200
    hung = asyncio.Event()
    standin.gate = hung
    await eventually(lambda: standin.exchanges_started == 2)
    await asyncio.sleep(1.2)  # past the token's life: the route is down
    assert await status(http, f"{proxy}/x") == 503
    standin.gate = None
    assert await recovered_within(http, f"{proxy}/x", 2.0) <= 2.0
    assert standin.rejected_tokens == []
    hung.set()


async def test_a_route_recovers_quickly_however_long_the_outage_was(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """However long the failure streak, a route without a token retries at most
    tokens.retry_max_without_token apart, so it gets a token within a second of the auth host
    recovering."""
    # retry_max is a minute: only the low ceiling without a token keeps retries close.
    standin.always = 500
    proxy = await start_proxy(
        tokens={"retry_max": 60, "retry_max_without_token": 0.3}, server={"eager": True}
    )
    await eventually(lambda: len(standin.exchanges) >= 8, within=5)  # a long failure streak
    standin.always = None
    # The streak alone would put the next attempt seconds away; no request helps here.
    await eventually(lambda: tokens_issued(standin) == 1, within=1.0)
    assert await status(http, f"{proxy}/x") == 200


async def test_every_route_is_back_soon_after_a_killed_auth_host_returns(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """After the auth host was down long enough for long failure streaks, every route (root and
    sub-organization) gets a new token within 0.6 s of its return."""
    standin.token_lifetime = 1.0
    proxy = await start_proxy(
        routes={
            "root": {"prefix": "/", "credential": "main"},
            "sub": {"prefix": "/sub", "credential": "main", "sub_organization": SUB_ORG},
        },
        tokens={"retry_max": 60, "retry_max_without_token": 0.3},
        server={"eager": True},
    )
    await eventually(lambda: tokens_issued(standin) == 2)
    await standin.kill("auth")

    async def long_streaks() -> bool:
        # Six failures in a row: without the low ceiling, the next try is >= 0.8 s away.
        return all([await failed_attempts(http, proxy, route) >= 6 for route in ("root", "sub")])

    await eventually(long_streaks, within=5)
    issued = tokens_issued(standin)
    await standin.revive("auth")
    await eventually(lambda: tokens_issued(standin) >= issued + 2, within=0.6)
    assert await status(http, f"{proxy}/x") == 200
    assert await status(http, f"{proxy}/sub/x") == 200


async def test_a_request_brings_the_next_attempt_forward(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A request arriving while the renewal loop waits out a long backoff triggers an exchange at
    once, so it gets 200 quickly after the auth host recovers."""
    standin.always = 500
    proxy = await start_proxy(tokens=SLOW_RETRIES)  # the loop alone: 5 s or more
    assert await status(http, f"{proxy}/x") == 503
    standin.always = None
    await asyncio.sleep(0.55)  # past the spacing between request-triggered attempts
    reply, took = await timed(http, f"{proxy}/x")
    assert reply.status == 200
    assert took < 0.5


async def test_a_flood_of_requests_does_not_hammer_a_failing_auth_host(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A flood of requests against a failing auth host gets quick 503s while exchanges stay at
    about one per half second, so the proxy does not hammer the auth host."""
    standin.always = 500
    proxy = await start_proxy(tokens=SLOW_RETRIES)
    started = time.monotonic()
    while time.monotonic() - started < 1.2:
        answers = await asyncio.gather(*(timed(http, f"{proxy}/x/{i}") for i in range(20)))
        assert {reply.status for reply, _ in answers} == {503}
        assert max(took for _, took in answers) < 0.5
    # One attempt per half second at most: the first, then two more in 1.2 s.
    assert 2 <= len(standin.exchanges) <= 4


async def test_an_endpoint_refusing_every_token_costs_a_handful_of_exchanges(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """An endpoint that answers 401 to every token costs at most a renewal per
    tokens.min_renew_interval, not one per request, and the route's other endpoints keep working."""
    proxy = await start_proxy(tokens={"min_renew_interval": 30})
    assert await status(http, f"{proxy}/x") == 200
    for _ in range(6):
        statuses = await asyncio.gather(
            *(status(http, f"{proxy}/_test/status/401") for _ in range(50))
        )
        assert set(statuses) == {401}
    assert len(standin.exchanges) <= 3  # the first token, one renewal (a spare for a race)
    assert await status(http, f"{proxy}/x") == 200  # the route's other endpoints still work


async def test_a_401_renews_again_once_min_renew_interval_has_passed(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A 401 renews and replays; a second 401 within tokens.min_renew_interval is relayed without
    a replay, and once the interval has passed a 401 renews again."""
    proxy = await start_proxy(tokens={"min_renew_interval": 0.3})
    assert await status(http, f"{proxy}/x") == 200
    standin.revoke_all()
    assert await status(http, f"{proxy}/x") == 200  # renewed and replayed
    standin.revoke_all()
    refused = len(standin.rejected_tokens)
    assert await status(http, f"{proxy}/x") == 401  # too soon: the API's answer stands
    assert len(standin.rejected_tokens) == refused + 1  # and no replay with the same token
    await asyncio.sleep(0.35)
    assert await status(http, f"{proxy}/x") == 200
    assert len(standin.exchanges) == 3


async def test_a_rejected_new_key_keeps_the_running_token(
    running: Running,
    standin: StandIn,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload whose new key the auth host rejects keeps the running token serving, logs an
    error and shows reload_failed on /_proxy/ready; once the key works, a reload switches to it
    at once."""
    proxy = running.urls[0]
    assert await status(http, f"{proxy}/x") == 200
    first_token = standin.api_requests[-1].token_id
    new_key = "pak_" + "0" * 32  # unknown to the auth host
    (tmp_path / "key").write_text(new_key)
    reload(running, tmp_path)
    await eventually(lambda: len(standin.exchanges) == 2)
    assert standin.exchanges[-1].status == 401
    assert await status(http, f"{proxy}/x") == 200
    assert standin.api_requests[-1].token_id == first_token
    ready = await request(http, "GET", f"{proxy}/_proxy/ready")
    assert ready.status == 200
    assert "rejected" in ready.json()["reload_failed"]["default"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("reload: the new key" in message for message in errors)

    standin.add_personal_key(new_key, ROOT_ORG)
    reload(running, tmp_path)  # the key now works: it takes over at once
    await eventually(lambda: standin.exchanges[-1].status == 200)
    assert await status(http, f"{proxy}/x") == 200
    assert standin.api_requests[-1].token_id != first_token
    assert "reload_failed" not in (await request(http, "GET", f"{proxy}/_proxy/ready")).json()


async def test_a_rejected_reload_leaves_the_previous_key_in_service_past_its_token(
    running: Running, standin: StandIn, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Issue 17, point 9: a reload never makes things worse. The auth host refuses the
    reloaded key; the running token expires; the previous key (the file now holds the
    refused one) renews it, so requests keep getting 200 and readiness says reload_failed,
    until a reload brings a key that works."""
    standin.token_lifetime = 1.0
    proxy = running.urls[0]
    assert await status(http, f"{proxy}/x") == 200
    obtained = time.monotonic()
    (tmp_path / "key").write_text("pak_typo")
    reload(running, tmp_path)
    await eventually(lambda: any(exchange.status == 401 for exchange in standin.exchanges))
    statuses: list[int] = []
    while time.monotonic() - obtained < 2.5:  # the first token's life, more than twice over
        statuses.append(await status(http, f"{proxy}/x"))
        await asyncio.sleep(0.02)
    assert set(statuses) == {200}
    assert tokens_issued(standin) >= 3  # renewed, with the previous key
    assert standin.rejected_tokens == []  # and no token was used past its life
    ready = await request(http, "GET", f"{proxy}/_proxy/ready")
    assert ready.status == 200
    assert "rejected" in ready.json()["reload_failed"]["default"]

    new_key = "pak_" + "1" * 32
    standin.add_personal_key(new_key, ROOT_ORG)
    (tmp_path / "key").write_text(new_key)
    reload(running, tmp_path)

    async def healed() -> bool:
        return "reload_failed" not in (await request(http, "GET", f"{proxy}/_proxy/ready")).json()

    await eventually(healed)
    assert await status(http, f"{proxy}/x") == 200


async def test_fresh_swaps_a_token_near_expiry_for_the_renewed_one_and_never_gives_a_dead_one(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """tokens.fresh() keeps a token in its refresh margin, raises TokenUnavailable within
    wait_timeout once it is past usable_until with the renewal hung, and returns the renewed
    token after."""
    standin.token_lifetime = 1.0  # renewal due at 0.8 s, unusable from 0.95 s
    settings = load_settings(write_config(tokens={"wait_timeout": 0.2}))
    async with connect(settings) as runtime:
        (route,) = runtime.routes
        taken = await route.tokens.get()
        assert await route.tokens.fresh(taken) is taken
        standin.gate = asyncio.Event()  # the renewal hangs
        await asyncio.sleep(max(0.0, taken.refresh_at + 0.05 - time.time()))
        assert await route.tokens.fresh(taken) is taken  # in the margin, still usable
        await asyncio.sleep(max(0.0, taken.usable_until + 0.02 - time.time()))
        started = time.monotonic()
        with pytest.raises(TokenUnavailable):
            await route.tokens.fresh(taken)
        assert time.monotonic() - started < 0.4
        standin.gate.set()
        renewed = await route.tokens.fresh(taken)
        assert renewed is not taken
        assert renewed.expires_at > taken.expires_at
        assert await route.tokens.fresh(taken) is renewed


async def test_a_request_in_the_refresh_margin_wakes_a_renewal_loop_that_overslept(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """When the wall clock jumps into a token's refresh margin (a laptop resumed from sleep), a
    request's to_send() starts the renewal the sleeping loop missed."""
    # The loop sleeps on the event loop's clock; tokens age on the wall clock. A laptop's
    # suspension moves only the second: the request path must then start the renewal.
    standin.token_lifetime = 600.0
    jump = [0.0]
    settings = load_settings(write_config())
    async with connect(settings, clock=lambda: time.time() + jump[0]) as runtime:
        (route,) = runtime.routes
        taken = await route.tokens.get()
        assert route.tokens.to_send() is taken
        await asyncio.sleep(0.1)
        assert len(standin.exchanges) == 1  # before the margin: no renewal
        jump[0] = (taken.refresh_at + taken.usable_until) / 2 - time.time()
        assert route.tokens.to_send() is taken  # in the margin, still usable
        await eventually(lambda: len(standin.exchanges) == 2)
        renewed = route.tokens.to_send()
        assert renewed is not None and renewed is not taken


async def test_an_unexpected_exchange_error_logs_its_type_never_its_text(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception during an exchange gives 503 auth_error and logs the exception
    type only, never its text, which may contain the key (the autouse leak check enforces it)."""

    async def broken(self: Exchanger) -> None:
        raise RuntimeError(f"form was personalAccessKey={PERSONAL_KEY}")

    monkeypatch.setattr(Exchanger, "exchange", broken)
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 503
    assert reply.json()["error"] == "auth_error"
    assert "RuntimeError" in caplog.text


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (INLINE_KEY_CONFIG, {"main": {"kind": "personal-access-key", "secret": ROTATED_KEY}}),
        (
            PERSONAL_KEY_CONFIG,
            {"main": {"kind": "personal-access-key", "secret_env": "TEST_ROTATED_KEY"}},
        ),
    ],
    ids=["inline-secret", "secret-env"],
)
async def test_a_key_changed_in_the_config_is_used_for_every_exchange_after_sighup(
    before: dict[str, object],
    after: dict[str, object],
    standin: StandIn,
    write_config: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After SIGHUP with a changed key (inline secret or secret_env), the proxy renews at once with
    the new key and uses it for every later exchange, never the old one."""
    # A process's environment is fixed at its start: a secret_env changes by naming
    # another variable, one the process was given from the start.
    monkeypatch.setenv("TEST_ROTATED_KEY", ROTATED_KEY)
    config = write_config(credentials=before)
    async with serving(config) as (proxy, process), aiohttp.ClientSession() as http:
        assert (await request(http, "GET", f"{proxy}/x")).status == 200
        # Rotated on Appcircle's side: only the new key is accepted from now on (tokens
        # already issued stay valid until they expire).
        standin.personal_keys = {ROTATED_KEY: ROOT_ORG}
        write_config(credentials=after)
        process.send_signal(signal.SIGHUP)
        await eventually(lambda: len(standin.exchanges) == 2, within=5)  # renewed at once
        assert standin.exchanges[-1].status == 200, "the reload renewed with the old key"
        # Later renewals use the new key too: the API refuses the token, the proxy renews.
        standin.revoke_all()
        assert (await request(http, "GET", f"{proxy}/x")).status == 200
        assert [exchange.status for exchange in standin.exchanges] == [200, 200, 200]


async def test_a_client_hanging_up_during_a_shared_exchange_fails_no_other_waiter(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A client hanging up while other requests wait on the same cold token exchange cancels nothing
    shared: the five others get 200 from a single exchange."""
    proxy = await start_proxy()
    standin.gate = asyncio.Event()  # the cold exchange is held until released
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    _, leaving = await asyncio.open_connection(host, int(port))
    leaving.write(b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await leaving.drain()
    await eventually(lambda: standin.exchanges_started == 1)
    others = [asyncio.create_task(request(http, "GET", f"{proxy}/other/{i}")) for i in range(5)]
    await asyncio.sleep(0.1)  # the others join the wait for the same exchange
    leaving.transport.abort()  # the first client hangs up: its handler is cancelled
    await asyncio.sleep(0.1)
    standin.gate.set()
    replies = await asyncio.gather(*others)
    assert [reply.status for reply in replies] == [200] * 5
    assert standin.exchanges_started == 1


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
