"""Fixtures: a stand-in Appcircle and the proxy, both real servers on loopback."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.server import Running, start
from proxy.settings import load_settings
from proxy.standin import StandIn

ROOT_ORG = "11111111-1111-4111-8111-111111111111"
SUB_ORG = "22222222-2222-4222-8222-222222222222"
OTHER_ORG = "33333333-3333-4333-8333-333333333333"
# Random per run, so a leak check can search for them and no real key looks like them.
PERSONAL_KEY = "pak_" + secrets.token_hex(16)
API_KEY_NAME = "ci-bot"
API_KEY_SECRET = "aks_" + secrets.token_hex(16)
CLIENT_TOKEN = "client_" + secrets.token_hex(16)

StartProxy = Callable[..., Awaitable[str]]


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Wait, polling, until `condition()` holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """All log lines of the test so far, formatted, tracebacks included (from teardown,
    `caplog.text` holds only the teardown's own records)."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    records = caplog.get_records("setup") + caplog.get_records("call")
    return "\n".join(formatter.format(record) for record in records)


@pytest.fixture
async def standin(caplog: pytest.LogCaptureFixture) -> AsyncIterator[StandIn]:
    appcircle = StandIn()
    appcircle.add_personal_key(PERSONAL_KEY, ROOT_ORG, SUB_ORG, OTHER_ORG)
    appcircle.add_api_key(API_KEY_NAME, API_KEY_SECRET, ROOT_ORG, SUB_ORG, OTHER_ORG)
    await appcircle.start()
    yield appcircle
    await appcircle.close()
    logged = everything_logged(caplog)
    leaked = [token for token in appcircle.issued_tokens if token in logged]
    assert not leaked, "a session token appeared in the logs"


@pytest.fixture
def write_config(tmp_path: Path, standin: StandIn) -> Callable[..., Path]:
    """Write a config file pointing at the stand-in; `body` adds credentials and routes."""

    def write(
        body: str,
        appcircle: str = "",
        tokens: str = "",
        server: str = "",
        api_url: str | None = None,
        auth_url: str | None = None,
    ) -> Path:
        path = tmp_path / "config.toml"
        if "eager" not in server:
            # Lazy by default here, so tests see the first exchange happen on demand.
            server += "\neager = false"
        path.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\n{server}\n'
            f'[appcircle]\napi_url = "{api_url or standin.api_url}"\n'
            f'auth_url = "{auth_url or standin.auth_url}"\n{appcircle}\n'
            f"[tokens]\nretry_initial = 0.05\nretry_max = 0.2\n{tokens}\n{body}",
            encoding="utf-8",
        )
        return path

    return write


# One credential of each kind; tests add the routes.
EVERY_KIND_CREDENTIALS = f"""
[credentials.access]
kind = "personal-access-key"
secret_env = "TEST_APPCIRCLE_KEY"
[credentials.legacy]
kind = "personal-api-token"
secret = "{PERSONAL_KEY}"
[credentials.service]
kind = "api-key"
name = "{API_KEY_NAME}"
secret_env = "TEST_API_KEY_SECRET"
"""

PERSONAL_KEY_CONFIG = """
[credentials.main]
kind = "personal-access-key"
secret_env = "TEST_APPCIRCLE_KEY"
"""


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test runs with debug logging; afterwards no key or client token may appear
    anywhere in what was logged (the stand-in checks its session tokens likewise)."""
    caplog.set_level(logging.DEBUG)
    yield
    logged = everything_logged(caplog)
    leaked = [s for s in (PERSONAL_KEY, API_KEY_SECRET, CLIENT_TOKEN) if s in logged]
    assert not leaked, "a key or client token appeared in the logs"


@pytest.fixture(autouse=True)
def key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_APPCIRCLE_KEY", PERSONAL_KEY)
    monkeypatch.setenv("TEST_API_KEY_SECRET", API_KEY_SECRET)


@pytest.fixture
async def start_proxy(write_config: Callable[..., Path]) -> AsyncIterator[StartProxy]:
    """Start the proxy with a config (body, appcircle=..., tokens=...); returns its URL."""
    proxies: list[Running] = []

    async def start_with(body: str = PERSONAL_KEY_CONFIG, **sections: str) -> str:
        proxy = await start(load_settings(write_config(body, **sections)))
        proxies.append(proxy)
        return proxy.urls[0]

    yield start_with
    for proxy in proxies:
        await proxy.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client, as curl or a script would be: no decompression, no cookies."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session
