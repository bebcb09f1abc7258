"""Tokens under faults: bounded waits, quick recovery, 401 storms, reloads of a bad key, the
last-moment token check, and no exception text in the logs. Real sockets against the
stand-in's fault modes; short tokens and small timeouts keep it fast."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.auth.exchange import Exchanger
from proxy.auth.tokens import TokenUnavailable
from proxy.config.load import load_settings
from proxy.serve.app import connect
from proxy.serve.server import Running, start
from tests.standin import StandIn

from .conftest import PERSONAL_KEY, ROOT_ORG, SUB_ORG, StartProxy, WriteConfig
from .support import Reply, eventually, request


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


# -- waits are bounded by tokens.wait_timeout ---------------------------------------------


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


# -- recovery -----------------------------------------------------------------------------


async def recovered_within(http: aiohttp.ClientSession, url: str, limit: float) -> float:
    """Seconds until a GET to `url` gets 200, polling; fails once `limit` has passed."""
    back = time.monotonic()
    while await status(http, url) != 200:
        assert time.monotonic() - back <= limit, f"the route was still down after {limit} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - back


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


# -- 401 storms ---------------------------------------------------------------------------


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


# -- reload -------------------------------------------------------------------------------


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


# -- the last-moment check (fresh) ---------------------------------------------------------


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


# -- no secret in the logs ----------------------------------------------------------------


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
    # The autouse leak check fails the test if the key reached the logs.
