"""Every real client: the client token in the client's own header (as the official CLI
sends it), the auth host's userinfo through the proxy, and least-privilege routes."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cli.main import main
from proxy.config.allow import RoutePolicy, parse_rule
from proxy.config.errors import ConfigError
from proxy.config.load import load_settings
from proxy.policy.headers import raw_request_headers, request_headers
from tests.standin import StandIn

from .conftest import CLIENT_TOKEN, PERSONAL_KEY_CONFIG, ROOT_ORG, SUB_ORG, StartProxy, WriteConfig
from .rawhttp import exchange, status_of
from .support import eventually, proxy_config, request

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


def write_toml(path: Path, routes: dict[str, Any]) -> None:
    """A config file with the test key and `routes`; no stand-in needed to load it."""
    document = proxy_config(
        "http://127.0.0.1:1", "http://127.0.0.1:2", credentials=PERSONAL_KEY_CONFIG, routes=routes
    )
    path.write_text(tomli_w.dumps(document))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- the client token in the client's own header -----------------------------------------


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


# -- userinfo through the proxy ---------------------------------------------------------


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
        # The key exchanges are answered at the proxy (test_local_exchange); other methods
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


# -- least-privilege routes -------------------------------------------------------------

CI_ROUTES = {
    "ci": {
        "prefix": "/ci",
        "credential": "main",
        "allow": ["GET /build/**", "POST /distribution/v2/profiles/*/app-versions"],
    },
    "viewer": {"prefix": "/viewer", "credential": "main", "read_only": True},
}


async def test_an_allow_list_lets_matching_requests_through_and_refuses_the_rest_before_a_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A route's allow list passes only matching method and path; the rest get 403
    not_allowed_by_route naming the route and its rules, before any token exchange."""
    proxy = await start_proxy(routes=CI_ROUTES)
    for method, path in (
        ("DELETE", "/ci/build/v2/profiles/1"),
        ("GET", "/ci/distribution/v2/profiles"),
        ("POST", "/ci/distribution/v2/profiles/p1/app-versions/extra"),
        ("GET", "/ci" + USERINFO),
        ("GET", "/ci/buildx"),
    ):
        reply = await request(http, method, proxy + path + "?page=1")
        assert reply.status == 403, (method, path)
        assert reply.json()["error"] == "not_allowed_by_route"
        assert reply.json()["route"] == "ci"
        assert (
            f"route 'ci' (/ci) does not allow {method} {path.removeprefix('/ci')} (its rules:"
            in (reply.json()["detail"])
        )
        assert '"GET /build/**"' in reply.json()["detail"]
    # Refused before any token was taken or anything reached Appcircle.
    assert standin.exchanges == [] and standin.api_requests == []
    for method, path in (
        ("GET", "/ci/build/v2/profiles"),
        ("GET", "/ci/build"),
        ("POST", "/ci/distribution/v2/profiles/p1/app-versions"),
    ):
        reply = await request(http, method, proxy + path, data=b"x" if method == "POST" else None)
        assert reply.status == 200, (method, path)
        assert reply.json()["raw_path"] == path.removeprefix("/ci")


async def test_a_read_only_route_allows_get_head_and_options_only(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A read_only route passes GET, HEAD and OPTIONS (userinfo too) and refuses POST, PUT, PATCH
    and DELETE with 403 saying read-only."""
    proxy = await start_proxy(routes=CI_ROUTES)
    for method in ("GET", "HEAD", "OPTIONS"):
        assert (await request(http, method, f"{proxy}/viewer/build/v2/profiles")).status == 200
    assert (await request(http, "GET", f"{proxy}/viewer{USERINFO}")).status == 200
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        reply = await request(http, method, f"{proxy}/viewer/build/v2/profiles")
        assert reply.status == 403, method
        assert reply.json()["route"] == "viewer"
        assert "read-only" in reply.json()["detail"]
    assert len(standin.api_requests) == 3


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


async def test_routes_without_rules_let_everything_through(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A route without allow or read_only forwards every method, even with restricted routes
    beside it."""
    proxy = await start_proxy(routes={**CI_ROUTES, "root": {"prefix": "/", "credential": "main"}})
    for method in ("GET", "POST", "DELETE"):
        assert (await request(http, method, f"{proxy}/anything/at/all")).status == 200


@pytest.mark.parametrize(
    ("rule", "method", "path", "allowed"),
    [
        ("GET /build/**", "GET", "/build", True),
        ("GET /build/**", "GET", "/build/v2/profiles/1/branches", True),
        ("GET /build/**", "GET", "/buildx/v2", False),
        ("GET /build/**", "HEAD", "/build/v2", False),
        ("GET /build/v2/**", "GET", "/build", False),
        ("* /task/v1/tasks/*", "DELETE", "/task/v1/tasks/42", True),
        ("* /task/v1/tasks/*", "GET", "/task/v1/tasks/42/logs", False),
        ("* /task/v1/tasks/*", "GET", "/task/v1/tasks", False),
        ("GET /", "GET", "/", True),
        ("GET /", "GET", "/build", False),
        ("GET /**/logs", "GET", "/logs", True),
        ("GET /**/logs", "GET", "/build/v1/commits/c/builds/b/logs", True),
        ("GET /**/logs", "GET", "/build/v1/logs/x", False),
        ("GET /build/**/builds/*/logs", "GET", "/build/v1/commits/c/builds/b/logs", True),
        ("GET /build/**/builds/*/logs", "GET", "/build/builds/b/logs", True),
        ("GET /build/**/builds/*/logs", "GET", "/build/v1/builds/logs", False),
        ("GET /**/x/**", "GET", "/a/b/x", True),
        ("GET /**/x/**", "GET", "/a/b/y/z", False),
    ],
)
def test_allow_rules_match_segments_as_written(
    rule: str, method: str, path: str, allowed: bool
) -> None:
    """Allow rules match whole segments: '*' is one segment, '**' zero or more, the method must
    match exactly (GET does not cover HEAD), and a prefix never matches a longer segment."""
    assert RoutePolicy((parse_rule(rule),)).allows(method, path) is allowed


@pytest.mark.parametrize(
    ("rules", "problem"),
    [
        (["GET build/**"], "the path must start with '/'"),
        (["GET /v*/x"], "'*' and '**' must be whole segments"),
        (["/build/**"], "is not 'METHOD /path/pattern'"),
        (["G(T /x"], "is not an HTTP method"),
        ([], "allow is empty"),
        ("GET /x", "allow is a list of rules"),
    ],
)
def test_a_bad_rule_stops_start_up_with_one_line_naming_it(
    rules: object, problem: str, tmp_path: Path
) -> None:
    """A malformed allow rule (relative path, partial wildcard, no method, bad method, empty or
    not a list) stops loading with a ConfigError naming routes.ci.allow and the problem."""
    path = tmp_path / "proxy.toml"
    write_toml(path, routes={"ci": {"prefix": "/ci", "credential": "main", "allow": rules}})
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert "routes.ci.allow" in str(raised.value)
    assert problem in str(raised.value)


def test_config_prints_the_rules_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`config` prints each route's allow rules (method upper-cased) and read_only flag, so the
    user sees what is enforced."""
    path = tmp_path / "proxy.toml"
    routes = copy.deepcopy(CI_ROUTES)
    routes["ci"]["allow"][1] = "post /distribution/v2/profiles/*/app-versions"
    write_toml(path, routes=routes)
    assert main(["config", "--config", str(path)]) == 0
    routes = json.loads(capsys.readouterr().out)["routes"]
    assert routes["ci"]["allow"] == [
        "GET /build/**",
        "POST /distribution/v2/profiles/*/app-versions",
    ]
    assert routes["ci"]["read_only"] is False
    assert (routes["viewer"]["allow"], routes["viewer"]["read_only"]) == (None, True)


def test_check_offline_prints_the_rules_under_their_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check --offline` prints each restricted route's allow rules, or read-only with its
    methods, on the line under the route."""
    path = tmp_path / "proxy.toml"
    write_toml(path, routes=CI_ROUTES)
    assert main(["check", "--offline", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ci = lines.index(next(line for line in lines if "route 'ci'" in line))
    assert lines[ci + 1].strip() == (
        'allow "GET /build/**", "POST /distribution/v2/profiles/*/app-versions"'
    )
    viewer = lines.index(next(line for line in lines if "route 'viewer'" in line))
    assert lines[viewer + 1].strip() == "read-only (GET, HEAD, OPTIONS)"


async def test_check_prints_the_rules_of_each_restricted_route(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """Online `check` prints one rule line per restricted route with its allow rules or read-only
    methods, and exits 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "check", "--config", str(write_config(routes=CI_ROUTES)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err
    rules = [line for line in out.decode().splitlines() if line.startswith("rule")]
    assert rules == [
        "rule /ci          route 'ci': allow \"GET /build/**\", "
        '"POST /distribution/v2/profiles/*/app-versions"',
        "rule /viewer      route 'viewer': read-only (GET, HEAD, OPTIONS)",
    ]
