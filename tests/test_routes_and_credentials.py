"""Routes and credentials: each kind of key, sub-organization routing, the org-claim check,
longest-prefix matching, and secret files re-read at each exchange."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support.standin import StandIn

from .conftest import (
    API_KEY_NAME,
    EVERY_KIND_CREDENTIALS,
    OTHER_ORG,
    PERSONAL_KEY,
    ROOT_ORG,
    SUB_ORG,
    StartProxy,
)
from .support import eventually, request

SUB_ORG_CREDENTIALS = {
    "main": {"kind": "personal-access-key", "secret_env": "TEST_APPCIRCLE_KEY"},
    "service": {"kind": "api-key", "name": API_KEY_NAME, "secret_env": "TEST_API_KEY_SECRET"},
}


def sub_org_routes(beta_organization: str = OTHER_ORG) -> dict[str, dict[str, str]]:
    return {
        "root": {"prefix": "/", "credential": "main"},
        "eu": {"prefix": "/eu", "credential": "main", "sub_organization": SUB_ORG},
        "eu_beta": {
            "prefix": "/eu/beta",
            "credential": "main",
            "sub_organization": beta_organization,
        },
        "bot": {"prefix": "/bot", "credential": "service", "sub_organization": SUB_ORG},
    }


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


async def test_each_credential_kind_uses_its_endpoint_and_fields(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Each credential kind exchanges at its own endpoint with its own form fields: a personal
    access key at /auth/v3/token, a personal API token at /auth/v2/token, an API key at
    /auth/v1/api-key/token."""
    proxy = await start_proxy(
        credentials=EVERY_KIND_CREDENTIALS,
        routes={
            "a": {"prefix": "/access", "credential": "access"},
            "l": {"prefix": "/legacy", "credential": "legacy"},
            "s": {"prefix": "/service", "credential": "service"},
        },
    )
    for prefix in ("/access", "/legacy", "/service"):
        reply = await request(http, "GET", f"{proxy}{prefix}/build/v2/profiles")
        assert reply.status == 200, reply.body
        body = reply.json()
        assert body["organization"] == ROOT_ORG
        assert body["raw_path"] == "/build/v2/profiles"
    endpoints = {exchange.endpoint: exchange.fields for exchange in standin.exchanges}
    assert endpoints == {
        "/auth/v3/token": {"personalAccessKey", "scope"},
        "/auth/v2/token": {"pat", "scope"},
        "/auth/v1/api-key/token": {"name", "secret"},
    }


async def test_each_sub_organization_route_has_its_own_token_longest_prefix_wins(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """The longest matching route prefix wins on whole segments, its prefix is stripped upstream,
    and each (credential, sub_organization) pair gets its own token with the sub-organization
    fields."""
    proxy = await start_proxy(credentials=SUB_ORG_CREDENTIALS, routes=sub_org_routes())
    expectations = {
        "/build/v2/profiles": (ROOT_ORG, "/build/v2/profiles"),
        "/eu/build/v2/profiles": (SUB_ORG, "/build/v2/profiles"),
        "/eu/beta/build/v2/profiles": (OTHER_ORG, "/build/v2/profiles"),
        "/eu/betamax": (SUB_ORG, "/betamax"),
        "/eu": (SUB_ORG, "/"),
        "/europe/x": (ROOT_ORG, "/europe/x"),
        "/bot/x": (SUB_ORG, "/x"),
    }
    for path, (organization, upstream_path) in expectations.items():
        reply = await request(http, "GET", proxy + path)
        assert reply.status == 200, reply.body
        seen = reply.json()
        assert (seen["organization"], seen["raw_path"]) == (organization, upstream_path), path
    assert len(standin.exchanges) == 4  # one per (credential, organization) pair
    by_org = {
        exchange.requested_organization: exchange
        for exchange in standin.exchanges
        if exchange.endpoint == "/auth/v3/token"
    }
    assert {"subOrganization", "subOrganizationId"} <= by_org[SUB_ORG].fields
    assert by_org[None].fields == {"personalAccessKey", "scope"}
    api_key_exchange = next(e for e in standin.exchanges if e.endpoint.endswith("api-key/token"))
    assert api_key_exchange.fields == {"name", "secret", "organizationId"}


async def test_servers_honouring_either_sub_organization_field_work(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A server that honours only subOrganizationId still yields a token for the route's
    sub-organization."""
    standin.sub_organization_field = "subOrganizationId"
    proxy = await start_proxy(credentials=SUB_ORG_CREDENTIALS, routes=sub_org_routes())
    reply = await request(http, "GET", f"{proxy}/eu/x")
    assert (reply.status, reply.json()["organization"]) == (200, SUB_ORG)


async def test_token_for_another_organization_is_refused_naming_both_ids(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A token for the wrong organization on a sub_organization route is refused with 503
    wrong_organization naming both ids, never sent to the API, while the root route still works."""
    standin.sub_organization_field = None  # this server ignores the sub-organization
    proxy = await start_proxy(credentials=SUB_ORG_CREDENTIALS, routes=sub_org_routes())
    reply = await request(http, "GET", f"{proxy}/eu/x")
    assert reply.status == 503
    body = reply.json()
    assert body["error"] == "wrong_organization"
    assert SUB_ORG in body["detail"] and ROOT_ORG in body["detail"]
    assert body["route"] == "eu"
    assert standin.api_requests == []  # the root token never went out on the sub-org route
    reply = await request(http, "GET", f"{proxy}/x")
    assert (reply.status, reply.json()["organization"]) == (200, ROOT_ORG)


async def test_key_without_access_to_the_sub_organization_is_reported_as_rejected(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A key the auth host refuses for a sub-organization (HTTP 403) gets 503 key_rejected saying
    HTTP 403."""
    unknown = "44444444-4444-4444-8444-444444444444"
    proxy = await start_proxy(credentials=SUB_ORG_CREDENTIALS, routes=sub_org_routes(unknown))
    reply = await request(http, "GET", f"{proxy}/eu/beta/x")
    assert reply.status == 503
    body = reply.json()
    assert body["error"] == "key_rejected"
    assert "HTTP 403" in body["detail"]


async def test_routes_sharing_a_credential_and_organization_share_one_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Two routes with the same credential and organization share one token: a single exchange
    serves both."""
    proxy = await start_proxy(
        routes={
            "a": {"prefix": "/a", "credential": "main"},
            "b": {"prefix": "/b", "credential": "main"},
        }
    )
    assert (await request(http, "GET", f"{proxy}/a/x")).status == 200
    assert (await request(http, "GET", f"{proxy}/b/x")).status == 200
    assert len(standin.exchanges) == 1


async def test_secret_file_is_reread_so_a_rotated_key_takes_effect(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A secret_file is read again at each exchange, so a key rotated on disk is used when the
    old token is revoked, without a restart."""
    secret_file = tmp_path / "appcircle-key"
    secret_file.write_text(PERSONAL_KEY + "\n")
    proxy = await start_proxy(
        credentials={"main": {"kind": "personal-access-key", "secret_file": str(secret_file)}}
    )
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    # Rotation: the old key and its tokens are revoked, a new key is mounted.
    rotated = PERSONAL_KEY + "-rotated"
    standin.personal_keys = {rotated: ROOT_ORG}
    standin.revoke_all()
    secret_file.write_text(rotated)
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 200, reply.body
    assert standin.exchanges[-1].status == 200 and len(standin.exchanges) == 2


async def test_secret_file_gone_is_a_clear_failure_then_recovers(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A secret_file that disappears gives 503 secret_unavailable naming the file, and the route
    recovers once the file is back."""
    secret_file = tmp_path / "appcircle-key"
    secret_file.write_text(PERSONAL_KEY)
    proxy = await start_proxy(
        credentials={"main": {"kind": "personal-access-key", "secret_file": str(secret_file)}}
    )
    secret_file.unlink()
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 503
    assert reply.json()["error"] == "secret_unavailable"
    assert str(secret_file) in reply.json()["detail"]
    secret_file.write_text(PERSONAL_KEY)

    async def served() -> bool:
        return (await request(http, "GET", f"{proxy}/x")).status == 200

    await eventually(served)
