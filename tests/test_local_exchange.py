"""Appcircle's key exchanges answered at the proxy (issue 18): the documented flow (POST the
key to /auth/v3/token, read access_token, send it as Authorization: Bearer) works unchanged
with the auth base URL at the proxy, under every route prefix, and hands out a local token,
never the real session token; nothing reaches the real auth host."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import jwt
import pytest

from proxy.auth.local_tokens import LocalTokens
from tests.standin import StandIn

from .conftest import API_KEY_NAME, CLIENT_TOKEN, PERSONAL_KEY, ROOT_ORG, SUB_ORG, StartProxy
from .rawhttp import exchange, status_of
from .support import Reply, request
from .test_clients import SUB_ORGANIZATION_ROUTES, WITH_CLIENT_TOKEN

# Each endpoint with the form a client copied from the docs would send to it.
DOCUMENTED_FORMS: list[tuple[str, dict[str, str]]] = [
    ("/auth/v3/token", {"personalAccessKey": "KEY", "scope": "openid,profile,email"}),
    ("/auth/v2/token", {"pat": "KEY", "scope": "openid,profile,email"}),
    ("/auth/v1/token", {"pat": "KEY"}),
    ("/auth/v1/api-key/token", {"name": API_KEY_NAME, "secret": "KEY"}),
]
ACCEPT_JSON = {"Accept": "application/json"}


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


async def exchange_at(
    http: aiohttp.ClientSession, base: str, endpoint: str, form: dict[str, str]
) -> Reply:
    return await request(http, "POST", base + endpoint, data=form, headers=ACCEPT_JSON)


@pytest.mark.parametrize(("endpoint", "form"), DOCUMENTED_FORMS)
@pytest.mark.parametrize(("prefix", "organization"), [("", ROOT_ORG), ("/eu", SUB_ORG)])
async def test_the_documented_exchange_then_api_calls_with_the_local_token(
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
    endpoint: str,
    form: dict[str, str],
    prefix: str,
    organization: str,
) -> None:
    """Guards the flow of Appcircle's docs with the auth base URL at the proxy: the reply is
    shaped like the auth host's, its token carries the route's organization, expires no
    later than the real token, is not the real token, and works for API calls."""
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES)
    answer = await exchange_at(http, proxy + prefix, endpoint, form)
    assert answer.status == 200, answer.body
    reply = answer.json()
    assert reply["token_type"] == "Bearer"
    assert answer.headers["Cache-Control"] == "no-store"
    local = reply["access_token"]
    assert local not in standin.issued_tokens
    (real,) = standin.issued_tokens  # the proxy's own exchange for the route, and only it
    assert [seen.fields for seen in standin.exchanges] == [
        frozenset(
            {"personalAccessKey", "scope"}
            | ({"subOrganization", "subOrganizationId"} if prefix else set())
        )
    ]
    claims, real_claims = claims_of(local), claims_of(real)
    assert claims["currentOrganizationId"] == organization
    assert (claims["sub"], claims["email"]) == (real_claims["sub"], real_claims["email"])
    assert claims["exp"] <= real_claims["exp"]
    assert 0 < reply["expires_in"] <= real_claims["exp"] - time.time() + 1

    api = await request(
        http,
        "GET",
        f"{proxy}{prefix}/build/v2/profiles",
        headers={"Authorization": f"Bearer {local}"},
    )
    assert api.status == 200
    assert api.json()["organization"] == organization
    assert local not in api.body.decode()  # the real token went upstream in its place
    assert len(standin.exchanges) == 1


async def test_with_a_client_token_the_exchange_needs_it_and_its_token_stands_for_it(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Guards the boundary: with server.client_token set, exchanging anything else (an
    Appcircle key included) gets 401, and the local token got with the client token is
    accepted where the client token is required."""
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES, server=WITH_CLIENT_TOKEN)
    for key in (PERSONAL_KEY, "wrong", CLIENT_TOKEN + "x"):
        refused = await exchange_at(http, proxy, "/auth/v3/token", {"personalAccessKey": key})
        assert refused.status == 401
        assert refused.json()["error"] == "exchange_key_rejected"
    assert standin.exchanges == []

    answer = await exchange_at(
        http, proxy + "/eu", "/auth/v3/token", {"personalAccessKey": CLIENT_TOKEN}
    )
    assert answer.status == 200
    local = answer.json()["access_token"]
    api = await request(
        http, "GET", f"{proxy}/eu/build/v2/profiles", headers={"Authorization": f"Bearer {local}"}
    )
    assert api.status == 200
    assert api.json()["organization"] == SUB_ORG
    # A forged one (the right claims, another secret) is no client token.
    forged = LocalTokens(time.time, secret=b"x" * 32).mint("eu", claims_of(local), time.time() + 60)
    refused = await request(
        http, "GET", f"{proxy}/eu/build/v2/profiles", headers={"Authorization": f"Bearer {forged}"}
    )
    assert refused.status == 401
    assert refused.json()["error"] == "client_token_required"


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ("/auth/v3/token", "subOrganization"),
        ("/auth/v3/token", "subOrganizationId"),
        ("/auth/v2/token", "subOrganization"),
        ("/auth/v1/api-key/token", "organizationId"),
    ],
)
async def test_a_sub_organization_served_under_another_prefix_gets_403_naming_it(
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
    endpoint: str,
    field: str,
) -> None:
    """Guards against a token for the wrong organization: asking the root route for the
    sub-organization is refused with the prefix that serves it; asking the right prefix
    (or for the root organization at the root) is answered."""
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES)
    key_form = dict(dict(DOCUMENTED_FORMS)[endpoint])
    refused = await exchange_at(http, proxy, endpoint, {**key_form, field: SUB_ORG})
    assert refused.status == 403
    assert refused.json()["error"] == "organization_not_served_here"
    assert "/eu" in refused.json()["detail"]
    served = await exchange_at(http, proxy + "/eu", endpoint, {**key_form, field: SUB_ORG})
    assert served.status == 200
    assert claims_of(served.json()["access_token"])["currentOrganizationId"] == SUB_ORG
    root = await exchange_at(http, proxy, endpoint, {**key_form, field: ROOT_ORG.upper()})
    assert root.status == 200
    assert {seen.endpoint for seen in standin.exchanges} == {"/auth/v3/token"}


async def test_a_local_token_works_only_under_its_prefix_and_until_it_expires(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Guards the binding of a local token to its route and its lifetime: one from /eu
    sent under / is refused (not silently used for the root organization), and an
    expired one gets 401, so the client logs in again as it would with Appcircle's."""
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES)
    answer = await exchange_at(http, proxy + "/eu", "/auth/v3/token", {"personalAccessKey": "k"})
    local = answer.json()["access_token"]
    elsewhere = await request(
        http, "GET", f"{proxy}/build/v2/profiles", headers={"Authorization": f"Bearer {local}"}
    )
    assert elsewhere.status == 401
    assert elsewhere.json()["error"] == "local_token_other_route"
    assert "/eu" in elsewhere.json()["detail"]
    # Signed with this process's secret, as the proxy's own are (the proxy runs in-process).
    expired = LocalTokens(time.time).mint("eu", claims_of(local), time.time() - 1)
    late = await request(
        http, "GET", f"{proxy}/eu/build/v2/profiles", headers={"Authorization": f"Bearer {expired}"}
    )
    assert late.status == 401
    assert late.json()["error"] == "local_token_expired"
    assert standin.api_requests == []


async def test_an_exchange_without_its_key_field_gets_400_and_other_auth_paths_stay_404(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Guards the shape of refusals: a form without the endpoint's key field is a 400 that
    names it, one without a length is not read (411); a GET on an exchange path or another
    auth-host path is still not relayed."""
    proxy = await start_proxy()
    missing = await exchange_at(http, proxy, "/auth/v1/api-key/token", {"secret": "s"})
    assert missing.status == 400
    assert "name" in missing.json()["detail"]
    chunked = await exchange(
        proxy,
        b"POST /auth/v3/token HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n"
        b"13\r\npersonalAccessKey=k\r\n0\r\n\r\n",
    )
    assert status_of(chunked) == 411
    for method, path in (("GET", "/auth/v3/token"), ("POST", "/auth/v4/token")):
        other = await request(http, method, proxy + path)
        assert other.status == 404
        assert other.json()["error"] == "not_forwarded_to_auth_host"
    assert standin.exchanges == []


async def test_an_exchange_path_another_route_serves_still_needs_the_client_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Guards the guard's exemption: /auth/v3/token is the root route's exchange only if
    no longer prefix takes it; under a route '/auth' it is an API path, and without the
    client token it is refused, never forwarded."""
    routes = {
        "root": {"prefix": "/", "credential": "main"},
        "odd": {"prefix": "/auth", "credential": "main"},
    }
    proxy = await start_proxy(routes=routes, server=WITH_CLIENT_TOKEN)
    reply = await exchange_at(http, proxy, "/auth/v3/token", {"personalAccessKey": CLIENT_TOKEN})
    assert reply.status == 407
    assert standin.api_requests == []
    served = await exchange_at(
        http, proxy, "/auth/auth/v3/token", {"personalAccessKey": CLIENT_TOKEN}
    )
    assert served.status == 200


async def test_with_a_client_token_an_expired_local_token_says_so(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Guards the answer a logged-in client gets once its local token ends while a client
    token is configured: 401 local_token_expired (log in again), not a bare refusal."""
    proxy = await start_proxy(server=WITH_CLIENT_TOKEN)
    claims = {"currentOrganizationId": ROOT_ORG, "sub": "s", "email": "e"}
    expired = LocalTokens(time.time).mint("default", claims, time.time() - 1)
    late = await request(
        http, "GET", f"{proxy}/build/v2/profiles", headers={"Authorization": f"Bearer {expired}"}
    )
    assert late.status == 401
    assert late.json()["error"] == "local_token_expired"
    assert standin.api_requests == []
