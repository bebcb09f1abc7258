"""Keys and tokens never show: not in logs (even at debug), error bodies, or reprs."""

from __future__ import annotations

import contextlib
import logging

import aiohttp
import pytest

from proxy.config.load import load_settings
from proxy.serve.app import connect
from tests.standin import StandIn

from .conftest import (
    API_KEY_SECRET,
    EVERY_KIND_CREDENTIALS,
    PERSONAL_KEY,
    SUB_ORG,
    StartProxy,
    WriteConfig,
)
from .support import request

EVERY_KIND = {
    "credentials": EVERY_KIND_CREDENTIALS,
    "routes": {
        "a": {"prefix": "/", "credential": "access"},
        "l": {"prefix": "/legacy", "credential": "legacy", "sub_organization": SUB_ORG},
        "s": {"prefix": "/service", "credential": "service"},
    },
}


def assert_no_secret(text: str, standin: StandIn) -> None:
    for secret in (PERSONAL_KEY, API_KEY_SECRET, *standin.issued_tokens):
        assert secret not in text
    # Token fragments too: the JWT signature is the part that grants access.
    for token in standin.issued_tokens:
        assert token.rsplit(".", 1)[-1] not in text


async def test_no_secret_in_debug_logs_or_error_bodies(
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No key, API key secret, session token or token signature appears in debug-level logs or in
    the proxy's own error bodies, across every credential kind, replays, cut answers and rejected
    keys."""
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    # Every 401 renews here (the /_test/status/401 below would otherwise hold off the
    # renewal after the revocation for tokens.min_renew_interval).
    proxy = await start_proxy(**EVERY_KIND, tokens={"min_renew_interval": 0})
    # The stand-in API echoes what it received, Authorization included: that is the
    # upstream's business. What is checked here is what the proxy itself says.
    for path in ("/x", "/legacy/x", "/service/x", "/_test/status/401", "/_test/cut"):
        with contextlib.suppress(aiohttp.ClientPayloadError):  # /_test/cut ends mid-body
            await request(http, "GET", proxy + path)
    standin.revoke_all()
    assert (await request(http, "POST", f"{proxy}/x", data=b"replayed")).status == 200
    standin.personal_keys.clear()  # every personal key is now rejected
    standin.revoke_all()
    for path in ("/x", "/legacy/x"):
        reply = await request(http, "GET", proxy + path)
        assert reply.status == 503
        bodies.append(reply.body.decode())
    assert any("key_rejected" in body for body in bodies)
    assert len(standin.issued_tokens) >= 4
    assert_no_secret(caplog.text, standin)
    assert_no_secret("\n".join(bodies), standin)


async def test_reprs_hold_no_secret(standin: StandIn, write_config: WriteConfig) -> None:
    """The repr of settings, routes, credentials, token caches and tokens (and str of a
    credential) holds no key, secret or token, so printing or logging them leaks nothing."""
    settings = load_settings(write_config(**EVERY_KIND))
    async with connect(settings) as upstream:
        texts = [repr(settings)]
        for route in upstream.routes:
            token = await route.tokens.get()
            texts += [repr(route), repr(route.credential), repr(route.tokens), repr(token)]
            texts.append(str(route.credential))
    assert_no_secret("\n".join(texts), standin)
