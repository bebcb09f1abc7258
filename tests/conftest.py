"""Fixtures: a stand-in Appcircle and the proxy, both real servers on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from proxy.config.load import load_settings
from proxy.config.settings import ENV_PREFIX
from proxy.serve.server import Running, start
from tests.support.rawapi import Answer, HeadAnswer, MakeApi, RawApi, Received
from tests.support.standin import StandIn

from .support import proxy_config

ROOT_ORG = "11111111-1111-4111-8111-111111111111"
SUB_ORG = "22222222-2222-4222-8222-222222222222"
OTHER_ORG = "33333333-3333-4333-8333-333333333333"
# Random per run, so a leak check can search for them and no real key looks like them.
PERSONAL_KEY = "pak_" + secrets.token_hex(16)
API_KEY_NAME = "ci-bot"
API_KEY_SECRET = "aks_" + secrets.token_hex(16)
CLIENT_TOKEN = "client_" + secrets.token_hex(16)

StartProxy = Callable[..., Awaitable[str]]
# Appcircle's own variables (zero-config) and the proxy's settings variables.
ZERO_CONFIG_PREFIXES = ("APPCIRCLE_PERSONAL_", "APPCIRCLE_API_KEY_", "APPCIRCLE_SUB_ORGANIZATION")
WriteConfig = Callable[..., Path]
EGRESS_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


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
def write_config(tmp_path: Path, standin: StandIn) -> WriteConfig:
    """Write a config file for the proxy in front of the stand-in and return its path.
    Keywords are the config's tables as dicts (`credentials=`, `routes=`, `server=`,
    `appcircle=`, `tokens=`, `log=`), laid over the defaults of `support.proxy_config`;
    the credentials default to `PERSONAL_KEY_CONFIG`."""

    def write(**tables: Any) -> Path:
        tables.setdefault("credentials", PERSONAL_KEY_CONFIG)
        path = tmp_path / "config.toml"
        document = proxy_config(standin.api_url, standin.auth_url, **tables)
        path.write_text(tomli_w.dumps(document), encoding="utf-8")
        return path

    return write


# The personal access key from the environment: the credentials most tests use.
PERSONAL_KEY_CONFIG: dict[str, Any] = {
    "main": {"kind": "personal-access-key", "secret_env": "TEST_APPCIRCLE_KEY"}
}

# The key inline, for a separate proxy process (which does not share our environment).
INLINE_KEY_CONFIG: dict[str, Any] = {
    "main": {"kind": "personal-access-key", "secret": PERSONAL_KEY}
}

# One credential of each kind; tests add the routes.
EVERY_KIND_CREDENTIALS: dict[str, Any] = {
    "access": {"kind": "personal-access-key", "secret_env": "TEST_APPCIRCLE_KEY"},
    "legacy": {"kind": "personal-api-token", "secret": PERSONAL_KEY},
    "service": {"kind": "api-key", "name": API_KEY_NAME, "secret_env": "TEST_API_KEY_SECRET"},
}


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
    # A developer who exported a real key (as the Quick start says) must not see it used,
    # nor see config-file tests refused as ambiguous; the tests that want these set them.
    for name in list(os.environ):
        if name.startswith(ZERO_CONFIG_PREFIXES) or name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
        # The machine's egress proxy would stand between the proxy and the stand-in.
        if name.lower() in EGRESS_VARIABLES:
            monkeypatch.delenv(name)


@pytest.fixture
async def start_proxy(write_config: WriteConfig) -> AsyncIterator[StartProxy]:
    """Start the proxy in this process; keywords as `write_config`. Returns its URL."""
    proxies: list[Running] = []

    async def start_with(**tables: Any) -> str:
        proxy = await start(load_settings(write_config(**tables)))
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


@pytest.fixture
async def raw_api() -> AsyncIterator[Callable[[Answer], Awaitable[RawApi]]]:
    """Start a scripted raw API (support/rawapi.py) with the given answer; returns it."""
    apis: list[RawApi] = []

    async def make(answer: Answer) -> RawApi:
        api = RawApi(answer)
        await api.start()
        apis.append(api)
        return api

    yield make
    for api in apis:
        await api.close()


def write_toml(path: Path, routes: dict[str, Any]) -> None:
    """A config file with the test key and `routes`; no stand-in needed to load it."""
    document = proxy_config(
        "http://127.0.0.1:1", "http://127.0.0.1:2", credentials=PERSONAL_KEY_CONFIG, routes=routes
    )
    path.write_text(tomli_w.dumps(document))


@pytest.fixture
async def scripted_api(raw_api: MakeApi) -> Callable[[HeadAnswer], Awaitable[RawApi]]:
    """The raw API (support/rawapi.py) answered by a function of the request head."""

    async def make(answer: HeadAnswer) -> RawApi:
        async def by_head(
            received: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await answer(received.head, reader, writer)

        return await raw_api(by_head)

    return make
