"""The proxy's own error answers, all in one place: JSON with a stable code and a detail
that says what happened and what to do."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from ..auth.tokens import TokenUnavailable
from ..telemetry.facts import ERROR_CODE
from .routes import Route

__all__ = [
    "admission_refused",
    "auth_path_not_forwarded",
    "auth_unreachable",
    "bad_request_body",
    "body_not_allowed",
    "client_not_allowed",
    "no_route",
    "not_allowed_by_route",
    "override_on_restricted_route",
    "refused",
    "token_unavailable",
    "upstream_bad_response",
    "upstream_refused_websocket",
    "upstream_timeout",
    "upstream_unreachable",
]


def _answer(status: int, error: str, detail: str, **extra: Any) -> web.Response:
    assert status >= 400, "the access log looks for error codes on 4xx and 5xx only"
    response = web.json_response({"error": error, "detail": detail, **extra}, status=status)
    response.headers["Cache-Control"] = "no-store"
    response[ERROR_CODE] = error
    return response


def refused(status: int, error: str, detail: str) -> web.Response:
    """The inbound guard's answer to a request it will not forward."""
    return _answer(status, error, detail)


def client_not_allowed(client: str, route: Route) -> web.Response:
    return _answer(
        403,
        "client_not_allowed",
        f"client '{client}' may not use route '{route.name}' ({route.prefix}); "
        f"add it to clients.{client}.routes if it should",
        client=client,
        route=route.name,
    )


def no_route(path: str, prefixes: list[str]) -> web.Response:
    return _answer(
        404,
        "no_route",
        f"no route matches '{path}'; configured prefixes: {', '.join(prefixes)}. "
        "Send the request under one of them, or add a [routes.NAME] for this prefix",
        prefixes=prefixes,
    )


def token_unavailable(route: Route, problem: TokenUnavailable) -> web.Response:
    retry_after = max(1, math.ceil(problem.retry_after))
    response = _answer(
        503,
        problem.failure.kind,
        f"route '{route.name}' ({route.prefix}) has no valid session token: "
        f"{problem.failure.detail}",
        route=route.name,
        credential=route.credential.name,
        retry_after=retry_after,
    )
    response.headers["Retry-After"] = str(retry_after)
    return response


def upstream_unreachable(api_url: str, reason: str) -> web.Response:
    return _answer(
        502,
        "upstream_unreachable",
        f"the Appcircle API at {api_url} cannot be reached ({reason}); check "
        "appcircle.api_url and this machine's network",
    )


def upstream_bad_response(api_url: str, reason: str) -> web.Response:
    return _answer(
        502,
        "upstream_bad_response",
        f"the Appcircle API at {api_url} sent an answer the proxy will not relay ({reason}); "
        "retry, and report it to the API's operator if it persists",
    )


def upstream_refused_websocket(status: int) -> web.Response:
    return _answer(
        502,
        "websocket_refused",
        f"the Appcircle API refused the WebSocket upgrade with HTTP {status}",
        upstream_status=status,
    )


def upstream_timeout(api_url: str) -> web.Response:
    return _answer(
        504,
        "upstream_timeout",
        f"the Appcircle API at {api_url} did not answer in time; retry, or raise "
        "appcircle.connect_timeout / appcircle.read_timeout if it is merely slow",
    )


def admission_refused(kind: str, detail: str, retry_after: int) -> web.Response:
    """No connection to the API for this request now (pool_full, pool_timeout,
    streams_full, flow_full): the proxy is at a configured limit."""
    response = _answer(503, kind, detail, retry_after=retry_after)
    response.headers["Retry-After"] = str(retry_after)
    return response


def bad_request_body(status: int, error: str, detail: str) -> web.Response:
    """The client's request body could not be read whole: too slow (408) or cut short (400)."""
    response = _answer(status, error, detail)
    # The rest of the body may still be arriving; the connection cannot carry another request.
    response.force_close()
    return response


def not_allowed_by_route(route: Route, method: str, path: str) -> web.Response:
    return _answer(
        403,
        "not_allowed_by_route",
        f"route '{route.name}' ({route.prefix}) does not allow {method} {path} (its rules: "
        f"{route.policy.describe()}); use a route that allows it, or add a rule to "
        f"routes.{route.name}.allow",
        route=route.name,
    )


def override_on_restricted_route(route: Route, what: str) -> web.Response:
    return _answer(
        403,
        "not_allowed_by_route",
        f"route '{route.name}' ({route.prefix}) has rules ({route.policy.describe()}), and "
        f"{what} asks the API to read this request as another method or path, which the "
        "rules did not see; send the method and path you mean, without it",
        route=route.name,
    )


def body_not_allowed(route: Route, method: str) -> web.Response:
    response = _answer(
        400,
        "body_not_allowed",
        f"route '{route.name}' ({route.prefix}) has rules ({route.policy.describe()}), and "
        f"this {method} carries a body, which an API that ignores {method} bodies would read "
        "as a request of its own; send it without a body",
        route=route.name,
    )
    # The body was not read: the connection cannot carry another request.
    response.force_close()
    return response


def auth_path_not_forwarded(path: str) -> web.Response:
    return _answer(
        404,
        "not_forwarded_to_auth_host",
        f"'{path}' is on the auth host, which the proxy does not expose: it holds the key "
        "and exchanges it itself. The key exchanges (POST /auth/v1/token, /auth/v2/token, "
        "/auth/v3/token, /auth/v1/api-key/token) are answered here with a local token, and "
        "GET /auth/realms/appcircle/protocol/openid-connect/userinfo is relayed (with the "
        "route's session token); nothing else",
    )


def auth_unreachable(auth_url: str, reason: str) -> web.Response:
    return _answer(
        502,
        "auth_unreachable",
        f"the Appcircle auth host at {auth_url} cannot be reached ({reason}); check "
        "appcircle.auth_url and this machine's network",
    )
