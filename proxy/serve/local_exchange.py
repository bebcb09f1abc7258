"""Appcircle's key exchanges, answered by the proxy itself under every route prefix, so a
tool that begins by logging in (the official CLI's `login`, scripts copied from the docs,
plugins with configurable endpoints) works unchanged with its auth base URL at the proxy.

The reply is shaped like the auth host's, but its `access_token` is a local token (see
auth.local_tokens): sent back as `Authorization: Bearer`, it is accepted for the route it
was issued under, and the route's real session token goes upstream in its place. Nothing
of this reaches the real auth host.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Final

from aiohttp import hdrs, web

from ..auth.exchange import unverified_claims
from ..auth.local_tokens import EXCHANGE_ENDPOINTS, LocalTokens
from ..auth.tokens import TokenUnavailable
from ..config.secrets import Client
from ..policy import errors
from ..policy.routes import Route, RouteTable

__all__ = ["EXCHANGE_ENDPOINTS", "LocalExchange", "exchange_paths"]

# An exchange's form is a key and an organization id: anything far larger is not one.
MAX_FORM_BYTES: Final = 16 * 1024
# Where clients name the organization they want a token for: v2 and v3 (either spelling,
# as official plugins disagree), and the API-key exchange.
ORGANIZATION_FIELDS: Final = ("subOrganization", "subOrganizationId", "organizationId")


def exchange_paths(routes: RouteTable) -> frozenset[str]:
    """Every path at which the proxy answers an exchange: each endpoint under each prefix,
    where that route (not a longer prefix's) serves it. The guard lets exactly these
    through without the client token, since the handler then checks the key itself."""
    paths = set()
    for route in routes:
        for endpoint in EXCHANGE_ENDPOINTS:
            path = ("" if route.prefix == "/" else route.prefix) + endpoint
            matched = routes.match(path)
            if matched is not None and matched[0] is route and matched[1] == endpoint:
                paths.add(path)
    return frozenset(paths)


def _client_of(key: str, clients: tuple[Client, ...]) -> Client | None:
    """The client whose token `key` is; every client compared, so timing tells nothing."""
    found = None
    for client in clients:
        if hmac.compare_digest(key.encode(), client.token.get_secret_value().encode()):
            found = found or client
    return found


def _invalid_token(error: str, detail: str) -> web.Response:
    response = errors.refused(401, error, detail)
    response.headers[hdrs.WWW_AUTHENTICATE] = (
        'Bearer realm="appcircle-proxy", error="invalid_token"'
    )
    return response


class LocalExchange:
    """Answers exchanges and checks the local tokens they hand out; one per process."""

    def __init__(
        self, routes: RouteTable, tokens: LocalTokens, clients: tuple[Client, ...]
    ) -> None:
        self._routes = routes
        self._tokens = tokens
        # Empty: the proxy asks for no client token, and any key value is accepted.
        self._clients = clients

    @staticmethod
    def is_exchange(method: str, path: str) -> bool:
        """Whether `path` (below a route's prefix) with `method` is an exchange."""
        return method == hdrs.METH_POST and path in EXCHANGE_ENDPOINTS

    def refusal(self, request: web.BaseRequest, route: Route) -> web.Response | None:
        """401 for a local token issued under another route, or expired; None otherwise
        (no local token at all is none of this module's business)."""
        local = self._tokens.read(request.headers.get(hdrs.AUTHORIZATION))
        if local is None:
            return None
        if local.route != route.name:
            issued = self._routes.by_name(local.route)
            where = f"under {issued.prefix}" if issued is not None else "for another route"
            return _invalid_token(
                "local_token_other_route",
                f"this token was issued {where}, not under {route.prefix} (route "
                f"'{route.name}'): send it under the prefix it came from, or exchange again "
                f"at {route.prefix.rstrip('/')}/auth/v3/token",
            )
        if local.expires_at <= self._tokens.clock():
            return _invalid_token(
                "local_token_expired",
                "this token from the proxy's key exchange has expired: exchange again "
                "(log in again), as with a token from Appcircle's auth host",
            )
        return None

    async def answer(self, request: web.BaseRequest, route: Route, endpoint: str) -> web.Response:
        form = await _form(request)
        if isinstance(form, web.Response):
            return form
        key_field = EXCHANGE_ENDPOINTS[endpoint]
        wanted = [key_field, "name"] if key_field == "secret" else [key_field]
        missing = [name for name in wanted if not form.get(name)]
        if missing:
            return errors.refused(
                400,
                "exchange_field_missing",
                f"POST {endpoint} needs the form field {' and '.join(missing)} "
                "(application/x-www-form-urlencoded), as on Appcircle's auth host",
            )
        client: Client | None = None
        if self._clients:
            client = _client_of(form[key_field], self._clients)
            if client is None:
                return _invalid_token(
                    "exchange_key_rejected",
                    f"this proxy has a client token: exchange it, not an Appcircle key (send "
                    f"the client token as '{key_field}'); the proxy holds the Appcircle key",
                )
            if client.routes is not None and route.name not in client.routes:
                return errors.client_not_allowed(client.name, route)
        try:
            token = route.tokens.to_send() or await route.tokens.get()
        except TokenUnavailable as problem:
            return errors.token_unavailable(route, problem)
        organization = token.organization_id or route.sub_organization
        requested = next((form[name] for name in ORGANIZATION_FIELDS if form.get(name)), None)
        if requested is not None and (
            organization is None or requested.lower() != organization.lower()
        ):
            return self._other_organization(route, requested)
        real_claims = unverified_claims(token.value)
        now = self._tokens.clock()
        expires_at = int(token.usable_until)
        access_token = self._tokens.mint(
            route.name, real_claims, expires_at, None if client is None else client.name
        )
        response = web.json_response(
            {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": max(0, expires_at - int(now)),
            }
        )
        # RFC 6749 5.1: a token answer is never cached.
        response.headers[hdrs.CACHE_CONTROL] = "no-store"
        response.headers[hdrs.PRAGMA] = "no-cache"
        return response

    def _other_organization(self, route: Route, requested: str) -> web.Response:
        serving = next(
            (
                other
                for other in self._routes
                if (other.sub_organization or "").lower() == requested.lower()
                or (
                    other.sub_organization is None
                    and (current := other.tokens.current()) is not None
                    and (current.organization_id or "").lower() == requested.lower()
                )
            ),
            None,
        )
        if serving is not None:
            where = serving.prefix.rstrip("/")
            detail = (
                f"organization {requested} is served under the prefix {serving.prefix} "
                f"(route '{serving.name}'), not under {route.prefix}: use "
                f"{where}/auth/... as the auth base URL and {serving.prefix} as the API's"
            )
        else:
            detail = (
                f"no route of this proxy serves organization {requested} (route "
                f"'{route.name}' under {route.prefix} serves its own): add a route with "
                f'sub_organization = "{requested}", or leave the organization out'
            )
        return errors.refused(403, "organization_not_served_here", detail)


async def _form(request: web.BaseRequest) -> Mapping[str, str] | web.Response:
    """The exchange's fields: a form, as Appcircle documents, or a JSON object."""
    length = request.content_length
    if length is not None and length > MAX_FORM_BYTES:
        return errors.refused(
            413, "exchange_too_large", f"an exchange's form is at most {MAX_FORM_BYTES} bytes"
        )
    if length is None and request.body_exists:
        # Every client sends its small form with a length; an unbounded one is not read.
        return errors.refused(
            411, "exchange_length_required", "send the exchange's form with a Content-Length"
        )
    if request.content_type == "application/json":
        try:
            document = json.loads(await request.read())
        except ValueError:
            document = None
        if not isinstance(document, dict):
            return errors.refused(
                400, "exchange_not_json", "the exchange's JSON body is not an object"
            )
        return {name: value for name, value in document.items() if isinstance(value, str)}
    posted = await request.post()
    return {name: value for name, value in posted.items() if isinstance(value, str)}
