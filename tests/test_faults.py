"""Tokens under faults: bounded waits, quick recovery, 401 storms, reloads of a bad key, the
last-moment token check, and no exception text in the logs. Real sockets against the
stand-in's fault modes; short tokens and small timeouts keep it fast."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import UPSTREAM, Upstream, connect
from proxy.exchange import Exchanger
from proxy.server import Running, start
from proxy.settings import load_settings
from proxy.standin import StandIn
from proxy.tokens import TokenUnavailable

from .conftest import PERSONAL_KEY, PERSONAL_KEY_CONFIG, SUB_ORG, StartProxy, eventually


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any, float]:
    """Status, JSON body (or None) and how long the answer took."""
    started = time.monotonic()
    async with http.get(url) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, time.monotonic() - started


@pytest.fixture
async def start_with_backoff(
    write_config: Callable[..., Path],
) -> AsyncIterator[Callable[..., Any]]:
    """As `start_proxy`, but `tokens` replaces the fast test backoff instead of adding to it."""
    running: list[Running] = []

    async def start_with(body: str = PERSONAL_KEY_CONFIG, **sections: str) -> str:
        config = write_config(body, **sections)
        lines = config.read_text().splitlines()
        kept = [line for line in lines if line not in ("retry_initial = 0.05", "retry_max = 0.2")]
        config.write_text("\n".join(kept))
        running.append(await start(load_settings(config)))
        return running[-1].urls[0]

    yield start_with
    for proxy in running:
        await proxy.stop()


def token_ok(standin: StandIn) -> int:
    return sum(1 for exchange in standin.exchanges if exchange.status == 200)


# -- waits are bounded by tokens.wait_timeout ---------------------------------------------


async def test_a_hung_auth_host_gets_requests_their_503_within_wait_timeout(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    standin.gate = asyncio.Event()  # every exchange hangs
    proxy = await start_proxy(tokens="wait_timeout = 0.3\nexchange_timeout = 30")
    answers = await asyncio.wait_for(
        asyncio.gather(*(get(http, f"{proxy}/x/{i}") for i in range(30))), 3
    )
    for status, body, took in answers:
        assert status == 503
        assert body["error"] == "auth_unreachable"
        assert "wait_timeout" in body["detail"]
        assert took < 1.0
    assert standin.exchanges_started == 1  # they all waited on the same attempt
    standin.gate.set()
    assert (await get(http, f"{proxy}/x"))[0] == 200


# -- recovery -----------------------------------------------------------------------------


async def test_a_route_recovers_quickly_however_long_the_outage_was(
    start_with_backoff: Callable[..., Any], standin: StandIn, http: aiohttp.ClientSession
) -> None:
    # retry_max is a minute: only the low ceiling without a token keeps retries close.
    standin.always = 500
    proxy = await start_with_backoff(
        tokens="retry_initial = 0.05\nretry_max = 60\nretry_max_without_token = 0.3",
        server="eager = true",
    )
    await eventually(lambda: len(standin.exchanges) >= 8, within=5)  # a long failure streak
    standin.always = None
    # The streak alone would put the next attempt seconds away; no request helps here.
    await eventually(lambda: token_ok(standin) == 1, within=1.0)
    assert (await get(http, f"{proxy}/x"))[0] == 200


async def test_every_route_is_back_soon_after_a_killed_auth_host_returns(
    start_with_backoff: Callable[..., Any], standin: StandIn, http: aiohttp.ClientSession
) -> None:
    standin.token_lifetime = 1.0
    proxy = await start_with_backoff(
        '[credentials.main]\nkind = "personal-access-key"\nsecret_env = "TEST_APPCIRCLE_KEY"\n'
        '[routes.root]\nprefix = "/"\ncredential = "main"\n'
        f'[routes.sub]\nprefix = "/sub"\ncredential = "main"\nsub_organization = "{SUB_ORG}"\n',
        tokens="retry_initial = 0.05\nretry_max = 60\nretry_max_without_token = 0.3",
        server="eager = true",
    )
    await eventually(lambda: token_ok(standin) == 2)
    await standin.kill("auth")
    await asyncio.sleep(1.5)  # both tokens expire; a streak of refused connections
    assert (await get(http, f"{proxy}/x"))[0] == 503
    assert (await get(http, f"{proxy}/sub/x"))[0] == 503
    ok_before = token_ok(standin)
    await standin.revive("auth")
    await eventually(lambda: token_ok(standin) >= ok_before + 2, within=0.6)
    assert (await get(http, f"{proxy}/x"))[0] == 200
    assert (await get(http, f"{proxy}/sub/x"))[0] == 200


async def test_a_request_brings_the_next_attempt_forward(
    start_with_backoff: Callable[..., Any], standin: StandIn, http: aiohttp.ClientSession
) -> None:
    # The loop alone would wait 5 s or more after the first failure.
    standin.always = 500
    proxy = await start_with_backoff(
        tokens="retry_initial = 10\nretry_max = 10\nretry_max_without_token = 10"
    )
    assert (await get(http, f"{proxy}/x"))[0] == 503
    standin.always = None
    await asyncio.sleep(0.55)  # past the spacing between request-triggered attempts
    status, _, took = await get(http, f"{proxy}/x")
    assert status == 200
    assert took < 0.5


async def test_a_flood_of_requests_does_not_hammer_a_failing_auth_host(
    start_with_backoff: Callable[..., Any], standin: StandIn, http: aiohttp.ClientSession
) -> None:
    standin.always = 500
    proxy = await start_with_backoff(
        tokens="retry_initial = 10\nretry_max = 10\nretry_max_without_token = 10"
    )
    started = time.monotonic()
    while time.monotonic() - started < 1.2:
        answers = await asyncio.gather(*(get(http, f"{proxy}/x/{i}") for i in range(20)))
        assert {status for status, _, _ in answers} == {503}
        assert max(took for _, _, took in answers) < 0.5
    # One attempt per half second at most: the first, then two more in 1.2 s.
    assert 2 <= len(standin.exchanges) <= 4


# -- 401 storms ---------------------------------------------------------------------------


async def test_an_endpoint_refusing_every_token_costs_a_handful_of_exchanges(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(tokens="min_renew_interval = 30")
    assert (await get(http, f"{proxy}/x"))[0] == 200
    for _ in range(6):
        answers = await asyncio.gather(*(get(http, f"{proxy}/_test/status/401") for _ in range(50)))
        assert {status for status, _, _ in answers} == {401}
    assert len(standin.exchanges) <= 3  # the first token, one renewal (a spare for a race)
    assert (await get(http, f"{proxy}/x"))[0] == 200  # the route's other endpoints still work


async def test_a_401_renews_again_once_min_renew_interval_has_passed(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(tokens="min_renew_interval = 0.3")
    assert (await get(http, f"{proxy}/x"))[0] == 200
    standin.revoke_all()
    assert (await get(http, f"{proxy}/x"))[0] == 200  # renewed and replayed
    standin.revoke_all()
    refused = len(standin.rejected_tokens)
    assert (await get(http, f"{proxy}/x"))[0] == 401  # too soon: the API's answer stands
    assert len(standin.rejected_tokens) == refused + 1  # and no replay with the same token
    await asyncio.sleep(0.35)
    assert (await get(http, f"{proxy}/x"))[0] == 200
    assert len(standin.exchanges) == 3


# -- reload -------------------------------------------------------------------------------


@pytest.fixture
async def proxy_with_key_file(
    standin: StandIn, write_config: Callable[..., Path], tmp_path: Path
) -> AsyncIterator[tuple[str, Upstream, Path, Path]]:
    """A proxy whose key is in a file; yields its URL, Upstream, key file and config."""
    key_file = tmp_path / "key"
    key_file.write_text(PERSONAL_KEY)
    config = write_config(
        f'[credentials.main]\nkind = "personal-access-key"\nsecret_file = "{key_file}"\n'
    )
    running: Running = await start(load_settings(config))
    yield running.urls[0], running.app[UPSTREAM], key_file, config
    await running.stop()


async def test_a_rejected_new_key_keeps_the_running_token(
    proxy_with_key_file: tuple[str, Upstream, Path, Path],
    standin: StandIn,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, upstream, key_file, config = proxy_with_key_file
    assert (await get(http, f"{proxy}/x"))[0] == 200
    first_token = standin.api_requests[-1].token_id
    key_file.write_text("pak_" + "0" * 32)  # unknown to the auth host
    upstream.reload(load_settings(config))  # what SIGHUP does
    await eventually(lambda: len(standin.exchanges) == 2)
    assert standin.exchanges[-1].status == 401
    assert (await get(http, f"{proxy}/x"))[0] == 200
    assert standin.api_requests[-1].token_id == first_token
    status, ready, _ = await get(http, f"{proxy}/_proxy/ready")
    assert status == 200
    assert "rejected" in ready["reload_failed"]["default"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("reload: the new key" in message for message in errors)

    standin.add_personal_key("pak_" + "0" * 32, standin.personal_keys[PERSONAL_KEY])
    upstream.reload(load_settings(config))  # the key is fixed: it takes over at once
    await eventually(lambda: len(standin.exchanges) == 3 and standin.exchanges[-1].status == 200)
    assert (await get(http, f"{proxy}/x"))[0] == 200
    assert standin.api_requests[-1].token_id != first_token
    assert "reload_failed" not in (await get(http, f"{proxy}/_proxy/ready"))[1]


async def test_a_changed_key_that_fails_does_not_drop_a_token_that_still_serves(
    standin: StandIn, http: aiohttp.ClientSession, write_config: Callable[..., Path]
) -> None:
    standin.token_lifetime = 1.0
    config = write_config(PERSONAL_KEY_CONFIG, tokens="retry_max_without_token = 0.1")
    running = await start(load_settings(config))
    try:
        proxy = running.urls[0]
        assert (await get(http, f"{proxy}/x"))[0] == 200
        obtained = time.monotonic()
        standin.always = 401  # the new key is refused
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TEST_APPCIRCLE_KEY", "pak_typo")
            running.app[UPSTREAM].reload(load_settings(config))
        await eventually(lambda: len(standin.exchanges) == 2)
        statuses: list[int] = []
        while not statuses or statuses[-1] == 200:
            statuses.append((await get(http, f"{proxy}/x"))[0])
            await asyncio.sleep(0.02)
        assert time.monotonic() - obtained >= 0.9
        assert statuses[-1] == 503
        assert standin.rejected_tokens == []
    finally:
        await running.stop()


# -- the last-moment check (fresh) ---------------------------------------------------------


async def test_fresh_swaps_a_token_near_expiry_for_the_renewed_one_and_never_gives_a_dead_one(
    standin: StandIn, write_config: Callable[..., Path]
) -> None:
    standin.token_lifetime = 1.0  # renewal due at 0.8 s, unusable from 0.95 s
    settings = load_settings(write_config(PERSONAL_KEY_CONFIG, tokens="wait_timeout = 0.2"))
    async with connect(settings) as upstream:
        (route,) = upstream.routes
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


# -- no secret in the logs ----------------------------------------------------------------


async def test_an_unexpected_exchange_error_logs_its_type_never_its_text(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(self: Exchanger) -> None:
        raise RuntimeError(f"form was personalAccessKey={PERSONAL_KEY}")

    monkeypatch.setattr(Exchanger, "exchange", broken)
    proxy = await start_proxy()
    status, body, _ = await get(http, f"{proxy}/x")
    assert status == 503
    assert body["error"] == "auth_error"
    assert "RuntimeError" in caplog.text
    # The autouse leak check fails the test if the key reached the logs.
