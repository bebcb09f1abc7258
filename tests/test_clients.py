"""Existing clients, unchanged: the client token in either header (as the official
CLI sends it), Appcircle's key exchange answered at the proxy with local tokens, the auth
host's userinfo, and the official CLI's commands replayed."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import ClientSession, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.auth.local_tokens import LocalTokens
from proxy.policy.headers import raw_request_headers, request_headers
from proxy.serve.userinfo import USERINFO_PATH
from tests.support.standin import StandIn

from .conftest import (
    API_KEY_NAME,
    CLIENT_TOKEN,
    PERSONAL_KEY,
    ROOT_ORG,
    SUB_ORG,
    StartProxy,
)
from .support import Reply, eventually, request
from .support.rawclient import exchange, status_of

WITH_CLIENT_TOKEN = {"client_token": CLIENT_TOKEN}


USERINFO = "/auth/realms/appcircle/protocol/openid-connect/userinfo"


SUB_ORGANIZATION_ROUTES = {
    "root": {"prefix": "/", "credential": "main"},
    "eu": {"prefix": "/eu", "credential": "main", "sub_organization": SUB_ORG},
}


def cli_request(path: str, host: str, access_token: str) -> bytes:
    """A request exactly as the official appcircle CLI (axios on Node) sends it, with
    AC_ACCESS_TOKEN set to `access_token` and API_HOSTNAME / AUTH_HOSTNAME at the proxy."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        "Accept: application/json\r\n"
        "User-Agent: Appcircle CLI/1.0.3\r\n"
        f"Authorization: Bearer {access_token}\r\n"
        "Accept-Encoding: gzip, compress, deflate, br\r\n"
        f"Host: {host}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode()


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def header_of(answer: bytes, name: str) -> str | None:
    head = answer.partition(b"\r\n\r\n")[0].decode()
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


CI_ROUTES = {
    "ci": {
        "prefix": "/ci",
        "credential": "main",
        "allow": ["GET /build/**", "POST /distribution/v2/profiles/*/app-versions"],
    },
    "viewer": {"prefix": "/viewer", "credential": "main", "read_only": True},
}


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


async def cli_get(proxy: str, path: str) -> Any:
    """GET `path` as the CLI does (its headers, AC_ACCESS_TOKEN = the client token); the
    JSON answer, after checking it is a 200."""
    answer = await exchange(proxy, cli_request(path, proxy.removeprefix("http://"), CLIENT_TOKEN))
    assert status_of(answer) == 200, answer
    return body_of(answer)


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


async def test_the_official_cli_with_the_client_token_as_its_access_token_gets_through(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """The official CLI, with the client token as AC_ACCESS_TOKEN in Authorization, gets 200 on
    root and sub-organization routes; its own headers pass, and its Authorization becomes the
    proxy's."""
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES, server=WITH_CLIENT_TOKEN)
    host = proxy.removeprefix("http://")
    for path, organization in (
        ("/distribution/v2/profiles", ROOT_ORG),
        ("/eu/build/v2/profiles", SUB_ORG),
        ("/eu/distribution/v2/testing-groups", SUB_ORG),
    ):
        answer = await exchange(proxy, cli_request(path, host, CLIENT_TOKEN))
        assert status_of(answer) == 200, answer
        seen = body_of(answer)
        assert seen["organization"] == organization
        headers = {name.lower(): value for name, value in seen["headers"]}
        # The CLI's own headers arrive untouched; its Authorization is the proxy's token.
        assert headers["accept"] == "application/json"
        assert headers["user-agent"] == "Appcircle CLI/1.0.3"
        assert headers["accept-encoding"] == "gzip, compress, deflate, br"
        assert headers["authorization"] in {f"Bearer {t}" for t in standin.issued_tokens}
        found = CLIENT_TOKEN in json.dumps(seen)
        assert not found, "a secret went through"


def test_neither_authorization_header_is_among_the_headers_sent_upstream() -> None:
    """Neither Authorization nor Proxy-Authorization from the client is among the headers built
    for upstream, whether from parsed headers or raw header bytes."""
    incoming = CIMultiDict(
        [
            ("Authorization", f"Bearer {CLIENT_TOKEN}"),
            ("Proxy-Authorization", f"Bearer {CLIENT_TOKEN}"),
            ("Accept", "application/json"),
        ]
    )
    assert list(request_headers(CIMultiDictProxy(incoming)).items()) == [
        ("Accept", "application/json")
    ]
    # The same on raw bytes, as the forwarding client sends them.
    raw = [(name.encode(), value.encode()) for name, value in incoming.items()]
    assert raw_request_headers(raw) == [b"Accept: application/json\r\n"]


@pytest.mark.parametrize("header", ["Authorization", "Proxy-Authorization"])
@pytest.mark.parametrize(
    "value",
    [f"Bearer {CLIENT_TOKEN}", f"bearer  {CLIENT_TOKEN} ", basic("ci", CLIENT_TOKEN)],
    ids=["bearer", "bearer-lowercase-spaced", "basic-password"],
)
async def test_the_client_token_is_accepted_in_either_header_as_bearer_or_basic_password(
    header: str, value: str, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """server.client_token is accepted in Authorization or Proxy-Authorization, as Bearer (any
    case, extra spaces) or as a Basic password, and never reaches the API."""
    proxy = await start_proxy(server=WITH_CLIENT_TOKEN)
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles", headers={header: value})
    assert reply.status == 200
    found = CLIENT_TOKEN in reply.body.decode()
    assert not found, "a secret went through"
    assert not [
        name for name, _ in reply.json()["headers"] if name.lower() == "proxy-authorization"
    ]


@pytest.mark.parametrize(
    "value",
    [
        "Bearer nope",
        f"Bearer {CLIENT_TOKEN}x",
        basic(CLIENT_TOKEN, ""),  # the token as the user name is not the password
        basic("ci", CLIENT_TOKEN[:-1]),
        f"Basic {CLIENT_TOKEN}",  # not base64
        f"Token {CLIENT_TOKEN}",
        CLIENT_TOKEN,
    ],
    # Named, so that no test id (printed in every report) holds the client token.
    ids=[
        "wrong-bearer",
        "bearer-with-a-suffix",
        "basic-user-name",
        "basic-wrong-password",
        "basic-not-base64",
        "other-scheme",
        "no-scheme",
    ],
)
async def test_a_wrong_token_in_authorization_gets_401_with_www_authenticate(
    value: str, start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A wrong client token in Authorization (wrong value, suffix, Basic user name, other scheme)
    gets 401 client_token_required with WWW-Authenticate and a hint about AC_ACCESS_TOKEN, before
    any exchange."""
    proxy = await start_proxy(server=WITH_CLIENT_TOKEN)
    reply = await request(
        http, "GET", f"{proxy}/build/v2/profiles", headers={"Authorization": value}
    )
    assert reply.status == 401
    assert reply.json()["error"] == "client_token_required"
    assert "AC_ACCESS_TOKEN" in reply.json()["detail"]
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="appcircle-proxy"'
    assert "Proxy-Authenticate" not in reply.headers
    assert standin.api_requests == [] and standin.exchanges == []


async def test_no_token_or_a_wrong_proxy_authorization_gets_407(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """No client token, or a wrong one in Proxy-Authorization, gets 407
    proxy_authentication_required with Proxy-Authenticate, and nothing reaches the API."""
    proxy = await start_proxy(server=WITH_CLIENT_TOKEN)
    for headers in (
        {},
        {"Proxy-Authorization": "Bearer nope"},
        {"Proxy-Authorization": "Bearer nope", "Authorization": "Bearer nope"},
    ):
        reply = await request(http, "GET", f"{proxy}/x", headers=headers)
        assert reply.status == 407, headers
        assert reply.json()["error"] == "proxy_authentication_required"
        assert reply.headers["Proxy-Authenticate"] == 'Bearer realm="appcircle-proxy"'
    assert standin.api_requests == []


async def test_the_token_in_one_header_lets_the_other_carry_anything_and_neither_goes_upstream(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """With the client token in one of Authorization or Proxy-Authorization, the other may hold
    anything; the request passes and neither header's value reaches the API."""
    proxy = await start_proxy(server=WITH_CLIENT_TOKEN)
    for headers in (
        {"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}", "Authorization": "Bearer the-tools"},
        {"Authorization": f"Bearer {CLIENT_TOKEN}", "Proxy-Authorization": "Basic eDp5"},
    ):
        reply = await request(http, "GET", f"{proxy}/x", headers=headers)
        assert reply.status == 200, headers
        echoed = reply.body.decode()
        found = CLIENT_TOKEN in echoed
        assert not found, "a secret went through"
        assert "the-tools" not in echoed and "eDp5" not in echoed


async def test_a_cors_preflight_from_an_allowed_origin_needs_no_client_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A CORS preflight (OPTIONS) from an allowed origin gets 204 without the client token, the
    request that follows still needs it (407 without), and a foreign origin's preflight gets 403."""
    origin = "http://localhost:3000"
    proxy = await start_proxy(server={**WITH_CLIENT_TOKEN, "allowed_origins": [origin]})
    preflight = {"Origin": origin, "Access-Control-Request-Method": "GET"}
    reply = await request(http, "OPTIONS", f"{proxy}/build/v2/profiles", headers=preflight)
    assert reply.status == 204
    assert reply.headers["Access-Control-Allow-Origin"] == origin
    # The request that follows the preflight still needs the token.
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles", headers={"Origin": origin})
    assert reply.status == 407
    reply = await request(
        http,
        "GET",
        f"{proxy}/build/v2/profiles",
        headers={"Origin": origin, "Authorization": f"Bearer {CLIENT_TOKEN}"},
    )
    assert reply.status == 200
    # A preflight from any other page is refused as before.
    foreign = {**preflight, "Origin": "https://evil.example"}
    reply = await request(http, "OPTIONS", f"{proxy}/build/v2/profiles", headers=foreign)
    assert reply.status == 403
    assert len(standin.api_requests) == 1


async def test_userinfo_goes_to_the_auth_host_with_the_routes_session_token(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """The OpenID userinfo path, under each route's prefix, goes to the auth host with that
    route's session token, so the CLI sees the route's organization; the client token never goes
    along."""
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES, server=WITH_CLIENT_TOKEN)
    host = proxy.removeprefix("http://")
    for prefix, organization in (("", ROOT_ORG), ("/eu", SUB_ORG)):
        # What `appcircle organization view --organizationId current` sends with
        # AUTH_HOSTNAME at the proxy (and the route's prefix).
        answer = await exchange(proxy, cli_request(prefix + USERINFO, host, CLIENT_TOKEN))
        assert status_of(answer) == 200, answer
        assert body_of(answer)["currentOrganizationId"] == organization
        assert header_of(answer, "Content-Type") == "application/json; charset=utf-8"
    assert [seen.organization for seen in standin.userinfo_requests] == [ROOT_ORG, SUB_ORG]
    for seen in standin.userinfo_requests:
        headers = dict((name.lower(), value) for name, value in seen.headers)
        assert seen.raw_path == USERINFO
        assert headers["user-agent"] == "Appcircle CLI/1.0.3"
        found = CLIENT_TOKEN in json.dumps(seen.headers)
        assert not found, "a secret went through"
    assert standin.api_requests == []


async def test_userinfo_access_line_names_the_auth_hosts_answer(
    start_proxy: StartProxy, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """The JSON access line for a userinfo request records the auth host's status as
    upstream_status, with no error."""
    proxy = await start_proxy(log={"format": "json"})
    assert (await request(http, "GET", proxy + USERINFO)).status == 200
    written: list[str] = []

    def userinfo_lines() -> list[dict[str, Any]]:
        written.append(capsys.readouterr().err)
        lines = "".join(written).splitlines()
        return [json.loads(line) for line in lines if '"path": "/auth/realms' in line]

    await eventually(lambda: len(userinfo_lines()) > 0)
    (entry,) = userinfo_lines()
    assert (entry["status"], entry["upstream_status"], entry["error"]) == (200, 200, None)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        # The key exchanges are answered at the proxy (tested above); other methods
        # on their paths, and every other auth-host path, reach nothing.
        ("GET", "/auth/v3/token"),
        ("PUT", "/eu/auth/v1/api-key/token"),
        ("POST", "/auth/v3/token/"),
        ("POST", "/auth/realms/appcircle/protocol/openid-connect/token"),
        ("POST", USERINFO),
        ("GET", USERINFO + "/x"),
        ("GET", "/auth"),
        ("GET", "/eu/auth/"),
    ],
)
async def test_nothing_else_on_the_auth_host_is_reachable(
    method: str,
    path: str,
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
) -> None:
    """Only GET userinfo is relayed to the auth host: token endpoints, other methods and other
    auth paths get 404 not_forwarded_to_auth_host, and no exchange or upstream request happens."""
    proxy = await start_proxy(routes=SUB_ORGANIZATION_ROUTES)
    reply = await request(http, method, proxy + path, data=b"personalAccessKey=x")
    assert reply.status == 404
    assert reply.json()["error"] == "not_forwarded_to_auth_host"
    assert "userinfo" in reply.json()["detail"]
    assert standin.exchanges == [] and standin.api_requests == []
    assert standin.userinfo_requests == []


async def test_a_userinfo_token_the_auth_host_refuses_is_renewed_and_retried_once(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A userinfo request whose token the auth host refuses (revoked) is retried once with a
    renewed token and answered 200."""
    proxy = await start_proxy()
    assert (await request(http, "GET", proxy + USERINFO)).status == 200
    standin.revoke_all()
    reply = await request(http, "GET", proxy + USERINFO)
    assert reply.status == 200
    assert reply.json()["currentOrganizationId"] == ROOT_ORG
    assert len(standin.exchanges) == 2
    assert len(standin.userinfo_requests) == 2


async def test_userinfo_from_an_auth_host_that_cannot_be_reached_is_a_502(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Userinfo from an auth host that is down gets 502 auth_unreachable with a detail naming
    appcircle.auth_url."""
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 200  # a token, while it is up
    await standin.close()
    reply = await request(http, "GET", proxy + USERINFO)
    assert reply.status == 502
    assert reply.json()["error"] == "auth_unreachable"
    assert "appcircle.auth_url" in reply.json()["detail"]


async def test_an_answer_too_large_to_be_userinfo_is_not_relayed(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A userinfo answer over 65536 bytes is not relayed: the client gets 502 auth_unreachable
    saying it was too large."""
    standin.userinfo_padding = 100_000
    proxy = await start_proxy()
    reply = await request(http, "GET", proxy + USERINFO)
    assert reply.status == 502
    assert reply.json()["error"] == "auth_unreachable"
    assert "larger than 65536 bytes" in reply.json()["detail"]


@pytest.mark.parametrize(
    ("headers", "query", "named"),
    [
        ({"X-HTTP-Method-Override": "DELETE"}, "", "the X-HTTP-Method-Override header"),
        ({"X-HTTP-Method": "DELETE"}, "", "the X-HTTP-Method header"),
        ({"x-method-override": "DELETE"}, "", "the x-method-override header"),
        # CGI and WSGI servers read '_' in a header name as '-'.
        ({"X_HTTP_Method_Override": "DELETE"}, "", "the X_HTTP_Method_Override header"),
        ({"X-Original-URL": "/distribution/v2/profiles/p1"}, "", "the X-Original-URL header"),
        ({"X-Rewrite-URL": "/distribution/v2/profiles/p1"}, "", "the X-Rewrite-URL header"),
        ({}, "?_method=DELETE", "the _method query parameter"),
        ({}, "?page=1&%5Fmethod=DELETE", "the _method query parameter"),
    ],
)
async def test_method_and_path_overrides_are_refused_on_restricted_routes_naming_them(
    headers: dict[str, str],
    query: str,
    named: str,
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
) -> None:
    """An API that honours an override would act on a method or path the rules never saw:
    a POST the rules allow, read as DELETE, deletes with the proxy's token."""
    proxy = await start_proxy(routes={**CI_ROUTES, "root": {"prefix": "/", "credential": "main"}})
    for method, path in (
        ("POST", "/ci/distribution/v2/profiles/p1/app-versions"),
        ("GET", "/ci/build/v2/profiles"),
        ("GET", "/viewer/build/v2/profiles"),
    ):
        reply = await request(http, method, proxy + path + query, headers=headers)
        assert reply.status == 403, (method, path)
        assert reply.json()["error"] == "not_allowed_by_route"
        assert named in reply.json()["detail"]
    assert standin.api_requests == []
    # A route without rules lets the API decide, as before.
    reply = await request(http, "POST", f"{proxy}/anything{query}", headers=headers)
    assert reply.status == 200


async def test_a_read_only_method_with_a_body_is_refused_on_a_restricted_route(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """An API that ignores a GET's body reads it as the next request on the connection,
    carrying the proxy's token: a DELETE smuggled through a read-only route."""
    proxy = await start_proxy(routes=CI_ROUTES)
    smuggled = b"DELETE /distribution/v2/profiles/p1 HTTP/1.1\r\nHost: api\r\n\r\n"
    for method, path in (("GET", "/viewer/build/v2/profiles"), ("GET", "/ci/build/v2/profiles")):
        for framing in (
            b"Content-Length: %d\r\n" % len(smuggled),
            b"Transfer-Encoding: chunked\r\n",
        ):
            body = (
                smuggled
                if b"Length" in framing
                else b"%x\r\n%s\r\n0\r\n\r\n"
                % (
                    len(smuggled),
                    smuggled,
                )
            )
            answer = await exchange(
                proxy,
                f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
                + framing
                + b"\r\n"
                + body,
                read_for=0.5,
            )
            assert status_of(answer) == 400, (path, framing, answer[:200])
            assert b"body_not_allowed" in answer
    for method in ("GET", "HEAD", "OPTIONS"):
        answer = await exchange(
            proxy,
            f"{method} /viewer/build/v2/profiles HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Length: 1\r\n\r\nx".encode(),
            read_for=0.5,
        )
        assert status_of(answer) == 400, method
    assert standin.api_requests == []
    # An empty body is no body.
    answer = await exchange(
        proxy,
        b"GET /viewer/build/v2/profiles HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        read_for=1.0,
    )
    assert status_of(answer) == 200


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


async def test_userinfo_requests_are_bounded_like_api_calls(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Userinfo requests are admitted through the same pool as API calls: no more than
    appcircle.max_connections of them reach the auth host at once, the rest get 503."""
    # The userinfo relay runs on the WebSocket session (connector limit=0) and never asks
    # the pool for admission: any number of clients open as many connections to the auth
    # host at once, past max_connections and max_pending.
    in_flight = most = 0

    async def exchange_token(request: web.Request) -> web.Response:
        async with ClientSession() as session:
            async with session.post(
                standin.auth_url + request.path,
                data=await request.read(),
                headers={"Content-Type": request.content_type},
            ) as reply:
                return web.Response(
                    status=reply.status, body=await reply.read(), content_type="application/json"
                )

    async def slow_userinfo(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.3)
        finally:
            in_flight -= 1
        return web.json_response({"sub": "someone"})

    app = web.Application()
    app.router.add_post("/auth/v3/token", exchange_token)
    app.router.add_get(USERINFO_PATH, slow_userinfo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        proxy = await start_proxy(
            appcircle={
                "auth_url": f"http://127.0.0.1:{port}",
                "max_connections": 2,
                "max_streams": 2,
            },
            server={"max_pending": 0},
        )
        replies = await asyncio.gather(
            *(request(http, "GET", proxy + USERINFO_PATH) for _ in range(12))
        )
        assert {reply.status for reply in replies} <= {200, 503}
        assert most <= 2, f"{most} userinfo requests reached the auth host at once"
    finally:
        await runner.cleanup()
