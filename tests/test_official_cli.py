"""The official appcircle CLI's four commands of issue 10, replayed request for request as
the CLI sent them through the proxy in the trial with the real CLI (README, "Using the
official appcircle CLI"), against a stand-in answering with the fields the CLI's tables
read: with a client token as its access token, at the root and at a sub-organization's
prefix. And its `login` (issue 18), answered by the proxy with a local token."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from tests.standin import StandIn

from .conftest import CLIENT_TOKEN, ROOT_ORG, SUB_ORG, StartProxy
from .rawhttp import exchange, status_of
from .test_clients import SUB_ORGANIZATION_ROUTES, USERINFO, WITH_CLIENT_TOKEN, body_of, cli_request


async def cli_get(proxy: str, path: str) -> Any:
    """GET `path` as the CLI does (its headers, AC_ACCESS_TOKEN = the client token); the
    JSON answer, after checking it is a 200."""
    answer = await exchange(proxy, cli_request(path, proxy.removeprefix("http://"), CLIENT_TOKEN))
    assert status_of(answer) == 200, answer
    return body_of(answer)


@pytest.mark.parametrize(("prefix", "organization"), [("", ROOT_ORG), ("/eu", SUB_ORG)])
async def test_the_clis_four_commands_read_what_their_tables_need_for_the_routes_organization(
    start_proxy: StartProxy, standin: StandIn, prefix: str, organization: str
) -> None:
    """The official CLI's four commands (build profiles, distribution profiles, testing groups,
    organization view via userinfo), replayed through the proxy, get the fields their tables
    read, for the route's organization."""
    standin.cli_answers = True
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES, server=WITH_CLIENT_TOKEN)
    tag = organization[:8]

    # appcircle build profile list
    (profile,) = await cli_get(proxy, prefix + "/build/v2/profiles")
    assert profile["id"] == f"build-{tag}"
    assert {"name", "os", "buildPlatformType", "autoBuildCount"} <= profile.keys()
    # appcircle testing-distribution profile list: the table reads settings.authenticationType
    (profile,) = await cli_get(proxy, prefix + "/distribution/v2/profiles")
    assert profile["id"] == f"dist-{tag}"
    assert profile["settings"]["authenticationType"] == 1
    # appcircle testing-distribution testing-group list
    (group,) = await cli_get(proxy, prefix + "/distribution/v2/testing-groups")
    assert group["id"] == f"group-{tag}"
    # appcircle organization view --organizationId current: userinfo names the organization
    # (AUTH_HOSTNAME at the proxy), then its details come from the API.
    current = (await cli_get(proxy, prefix + USERINFO))["currentOrganizationId"]
    assert current == organization
    details = await cli_get(proxy, f"{prefix}/identity/v1/organizations/{current}")
    assert details["id"] == organization
    assert {"name", "memberCount", "createdDate"} <= details.keys()

    assert {seen.organization for seen in standin.api_requests} == {organization}
    assert [seen.organization for seen in standin.userinfo_requests] == [organization]


async def test_without_cli_answers_the_same_paths_are_echoed(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """Without the stand-in's CLI answers, a CLI request under /eu reaches the API with the
    prefix stripped and the sub-organization's token."""
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES, server=WITH_CLIENT_TOKEN)
    seen = await cli_get(proxy, "/eu/build/v2/profiles")
    assert seen["raw_path"] == "/build/v2/profiles"
    assert seen["organization"] == SUB_ORG


def cli_login(path: str, host: str, form: str) -> bytes:
    """`appcircle login pat --token ...` / `login api-key ...` as the CLI (2.7, axios)
    sends it: POST {AUTH_HOSTNAME}/auth/v1/token (or /auth/v1/api-key/token), a form."""
    body = form.encode()
    return (
        f"POST {path} HTTP/1.1\r\n"
        "Accept: application/json\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        "User-Agent: axios/1.7.7\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Accept-Encoding: gzip, compress, deflate, br\r\n"
        f"Host: {host}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("endpoint", "form"),
    [
        ("/auth/v1/token", f"pat={CLIENT_TOKEN}"),
        ("/auth/v1/api-key/token", f"name=ci-bot&secret={CLIENT_TOKEN}"),
    ],
)
@pytest.mark.parametrize(("prefix", "organization"), [("", ROOT_ORG), ("/eu", SUB_ORG)])
async def test_the_clis_login_then_build_profile_list_with_both_hosts_at_the_proxy(
    start_proxy: StartProxy,
    standin: StandIn,
    endpoint: str,
    form: str,
    prefix: str,
    organization: str,
) -> None:
    """Guards the CLI used unchanged (issue 18): `appcircle login` against AUTH_HOSTNAME at
    the proxy stores the local token as AC_ACCESS_TOKEN (its JWT names the organization the
    CLI's api-key login checks), and `build profile list` with it reads the route's
    profiles; no login reaches the auth host."""
    standin.cli_answers = True
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES, server=WITH_CLIENT_TOKEN)
    host = proxy.removeprefix("http://")
    if endpoint.endswith("api-key/token"):
        form += f"&organizationId={organization}"
    answer = await exchange(proxy, cli_login(prefix + endpoint, host, form))
    assert status_of(answer) == 200, answer
    access_token = body_of(answer)["access_token"]
    claims = jwt.decode(access_token, options={"verify_signature": False})
    assert claims["currentOrganizationId"] == organization

    reply = await exchange(proxy, cli_request(prefix + "/build/v2/profiles", host, access_token))
    assert status_of(reply) == 200, reply
    (profile,) = body_of(reply)
    assert profile["id"] == f"build-{organization[:8]}"
    assert [seen.organization for seen in standin.api_requests] == [organization]
    assert [seen.endpoint for seen in standin.exchanges] == ["/auth/v3/token"]
