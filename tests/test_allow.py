"""Least-privilege routes: allow rules and read_only let through what they say and
nothing else, checked before a token is used, and printed as written."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy.cli.main import main
from proxy.config.allow import RoutePolicy, parse_rule
from proxy.config.errors import ConfigError
from proxy.config.load import load_settings
from tests.support.standin import StandIn

from .conftest import (
    StartProxy,
    WriteConfig,
    write_toml,
)
from .support import request
from .support.rawclient import exchange, status_of

USERINFO = "/auth/realms/appcircle/protocol/openid-connect/userinfo"


CI_ROUTES = {
    "ci": {
        "prefix": "/ci",
        "credential": "main",
        "allow": ["GET /build/**", "POST /distribution/v2/profiles/*/app-versions"],
    },
    "viewer": {"prefix": "/viewer", "credential": "main", "read_only": True},
}


CI_ROUTE = {
    "ci": {
        "prefix": "/ci",
        "credential": "main",
        "allow": ["POST /distribution/v2/profiles/*/app-versions"],
    }
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


async def test_a_fragment_in_the_target_cannot_carry_a_request_past_an_allow_rule(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """A '#' in the request target cannot make a path match a route's allow rule: the request is
    refused with 400 or 403 and never reaches an endpoint the rule does not allow."""
    # The rule allows POST .../profiles/{id}/app-versions only. '#' is matched as part of
    # a segment ('p1#' fits '*'), the target goes upstream as sent, and the API, which
    # drops the fragment, reads a POST to /distribution/v2/profiles/p1: an endpoint the
    # rule does not allow.
    proxy = await start_proxy(routes=CI_ROUTE)
    answer = await exchange(
        proxy,
        b"POST /ci/distribution/v2/profiles/p1#/app-versions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    reached = [URL(seen.raw_path).path for seen in standin.api_requests]
    assert reached == [], f"the API served POST {reached}"
    assert status_of(answer) in (400, 403)
