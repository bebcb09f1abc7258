"""Behaviours that planted one-line bugs once broke without any test noticing (issue 12):
reload of a changed key, a hang-up during a shared exchange, the organization claim, exact
byte counts, same-site pages, an API URL with a path, the API's own CORS headers, and
`Expect: 100-continue`."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from tests.standin import StandIn

from .conftest import (
    INLINE_KEY_CONFIG,
    PERSONAL_KEY,
    PERSONAL_KEY_CONFIG,
    ROOT_ORG,
    SUB_ORG,
    StartProxy,
    WriteConfig,
)
from .processes import serving
from .rawhttp import exchange, json_of, status_of
from .support import eventually, request

ROTATED_KEY = PERSONAL_KEY + "-rotated"


# -- 1. reload where the key itself changes ---------------------------------------------


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


# -- 2. a client hanging up while others wait for the same cold exchange ----------------


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


# -- 3. a sub-organization token that names no organization -----------------------------


async def test_a_sub_organization_route_refuses_a_token_without_an_organization_claim(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A route with sub_organization refuses a token with no organization claim with 503
    wrong_organization, and the token is never sent to the API."""
    standin.organization_claim = False
    proxy = await start_proxy(
        routes={"eu": {"prefix": "/eu", "credential": "main", "sub_organization": SUB_ORG}}
    )
    reply = await request(http, "GET", f"{proxy}/eu/build/v2/profiles")
    assert reply.status == 503
    body = reply.json()
    assert body["error"] == "wrong_organization"
    assert SUB_ORG in body["detail"] and "no organization" in body["detail"]
    assert standin.api_requests == []  # the token never went out


# -- 4. exact byte counts ---------------------------------------------------------------


async def test_the_byte_metrics_count_exactly_the_body_bytes_of_each_route(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """appcircle_proxy_request_bytes_total and response_bytes_total count exactly the body bytes per
    route, for sized, chunked, upload and refused answers (route "-")."""
    proxy = await start_proxy()
    replies = [
        await request(http, "GET", f"{proxy}/_test/download?size=12345&length=1"),
        await request(http, "GET", f"{proxy}/_test/download?size=200000"),  # chunked, streamed
        await request(http, "POST", f"{proxy}/upload", data=b"y" * 1000),
        await request(http, "GET", f"{proxy}/_test/status/404"),
    ]
    refused = await request(http, "GET", f"{proxy}/x", headers={"Host": "evil.example"})
    assert [reply.status for reply in replies] + [refused.status] == [200, 200, 200, 404, 403]
    metrics = await request(http, "GET", f"{proxy}/_proxy/metrics")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.body.decode())
        for sample in family.samples
    }
    assert samples[("appcircle_proxy_request_bytes_total", (("route", "default"),))] == 1000
    assert samples[("appcircle_proxy_response_bytes_total", (("route", "default"),))] == sum(
        len(reply.body) for reply in replies
    )
    assert samples[("appcircle_proxy_response_bytes_total", (("route", "-"),))] == len(refused.body)


# -- 5. pages of a sibling site ---------------------------------------------------------


async def test_a_same_site_page_request_without_origin_is_refused(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A request with Sec-Fetch-Site: same-site and no Origin is refused 403 origin_not_allowed
    before reaching the API, while Sec-Fetch-Site: none (the user's own navigation) passes."""
    proxy = await start_proxy()
    # A page on another port or subdomain of the same site: fetch metadata, no Origin.
    reply = await request(http, "GET", f"{proxy}/x", headers={"Sec-Fetch-Site": "same-site"})
    assert reply.status == 403
    assert reply.json()["error"] == "origin_not_allowed"
    assert standin.api_requests == []
    # The user's own navigation (typing the URL) is not a page's doing.
    reply = await request(http, "GET", f"{proxy}/x", headers={"Sec-Fetch-Site": "none"})
    assert reply.status == 200


# -- 6. an api_url with a path ----------------------------------------------------------


async def test_an_api_url_with_a_path_keeps_it_upstream_and_out_of_rewritten_locations(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An api_url with a path (/api) is prefixed to every upstream request and stripped from
    Location headers rewritten to the proxy; locations outside that path are left as they are."""
    gateway = StandIn(api_base_path="/api")  # the API only answers under /api
    gateway.add_personal_key(PERSONAL_KEY, ROOT_ORG)
    await gateway.start()
    try:
        proxy = await start_proxy(
            routes={"eu": {"prefix": "/eu", "credential": "main"}},
            appcircle={"api_url": f"{gateway.api_url}/api", "auth_url": gateway.auth_url},
        )
        reply = await request(http, "GET", f"{proxy}/eu/build/v2/profiles?page=2")
        assert reply.status == 200, reply.body
        assert reply.json()["raw_path"] == "/api/build/v2/profiles?page=2"

        redirect = f"{proxy}/eu/_test/redirect"
        expectations = {
            None: f"{proxy}/eu/build/v2/profiles?page=1",  # absolute, under the base path
            "/api/distribution/v2/x#top": f"{proxy}/eu/distribution/v2/x#top",
            "/api": f"{proxy}/eu/",
            # Outside the base path: not the API's, so left as it is.
            f"{gateway.api_url}/other/x": f"{gateway.api_url}/other/x",
            "/apiary/x": "/apiary/x",
        }
        for to, location in expectations.items():
            params = {} if to is None else {"to": to}
            reply = await request(http, "GET", redirect, params=params, allow_redirects=False)
            assert (reply.status, reply.headers["Location"]) == (302, location), to
    finally:
        await gateway.close()


# -- 7. the API's own CORS headers ------------------------------------------------------


async def test_the_apis_own_cors_headers_never_reach_the_client(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The API's own Access-Control-* headers are dropped; an allowed Origin gets only the proxy's
    Access-Control-Allow-Origin for that origin, never the API's wildcard."""
    origin = "http://localhost:3000"
    proxy = await start_proxy(server={"allowed_origins": [origin]})

    def cors_of(headers: CIMultiDictProxy[str]) -> dict[str, str]:
        return {
            name: value
            for name, value in headers.items()
            if name.lower().startswith("access-control-")
        }

    reply = await request(http, "GET", f"{proxy}/_test/cors")
    assert (reply.status, reply.headers["X-Kept"]) == (200, "passes")
    assert cors_of(reply.headers) == {}
    # An allowed page gets the proxy's answer for its own origin, not the API's wildcard.
    reply = await request(http, "GET", f"{proxy}/_test/cors", headers={"Origin": origin})
    assert cors_of(reply.headers) == {"Access-Control-Allow-Origin": origin}


# -- 8. Expect: 100-continue ------------------------------------------------------------


async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """The proxy itself answers Expect: 100-continue, receives the body, and forwards the request
    without the Expect header."""
    proxy = await start_proxy()
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        # The client holds its body back until told to go on.
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        writer.write(b"hello")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        seen = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
    finally:
        writer.close()
    assert seen["body_length"] == 5
    assert "expect" not in [name.lower() for name, _ in seen["headers"]]
    (upstream,) = standin.api_requests
    assert "expect" not in [name.lower() for name, _ in upstream.headers]


async def test_a_refused_request_gets_its_refusal_instead_of_100_continue(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """A request with Expect: 100-continue that the guard refuses gets its 403 before sending a
    body, and an unknown expectation gets 417 expectation_failed; neither reaches the API."""
    proxy = await start_proxy()
    head = b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\n"
    # Refused by the guard: the client learns it before sending its body.
    answer = await exchange(
        proxy, head + b"Host: evil.example\r\nExpect: 100-continue\r\n\r\n", read_for=0.5
    )
    assert status_of(answer) == 403
    # An expectation the proxy does not know.
    answer = await exchange(
        proxy, head + b"Host: localhost\r\nExpect: something-else\r\n\r\n", read_for=0.5
    )
    assert status_of(answer) == 417
    assert json_of(answer)["error"] == "expectation_failed"
    assert standin.api_requests == []


# -- found while writing the unit tests -------------------------------------------------


async def test_a_scheme_relative_or_unreadable_location_is_relayed_not_a_500(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A scheme-relative Location to the API host is rewritten to the proxy, and one to another host
    or one that cannot be parsed is relayed unchanged with the 302, not turned into a 500."""
    proxy = await start_proxy()
    api_host = standin.api_url.removeprefix("http://")
    expectations = {
        f"//{api_host}/build/v2/x": f"{proxy}/build/v2/x",  # the API's, scheme-relative
        "//uploads.example.com/x": "//uploads.example.com/x",
        "http://[::1": "http://[::1",
    }
    for to, location in expectations.items():
        reply = await request(
            http, "GET", f"{proxy}/_test/redirect", params={"to": to}, allow_redirects=False
        )
        assert (reply.status, reply.headers.get("Location")) == (302, location), to
