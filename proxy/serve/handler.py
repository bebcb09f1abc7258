"""The one request handler, from the listening socket's parsed request to its answer.

Read top to bottom in `Handler._answer`: the guard's checks; a CORS preflight; the
proxy's own /_proxy/ paths; the route and its allow rules (and, on a restricted route, no
method or path override and no body on a read-only method); then the auth host's userinfo,
a WebSocket relay or the forwarder (key exchanges are answered by local_exchange before
the allow rules: they reach no Appcircle host). There are no middlewares or response
signals: every answer passes `_decorate` (request id, CORS, Connection: close while
draining) once, before its headers are sent.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from ..config.allow import READ_ONLY_METHODS
from ..paths import ADMIN_PREFIX
from ..policy import errors
from ..policy.guard import Guard
from ..policy.headers import request_headers
from ..policy.restricted import override
from ..policy.routes import Route, RouteTable
from ..telemetry.facts import ERROR_CODE, FACTS, Facts
from ..telemetry.stats import Stats
from ..upstream.pool import Pool, Refused, flow_of
from . import mcp, userinfo, websocket
from .drain import Drain
from .failures import refusal
from .forward import Forwarder
from .local_exchange import LocalExchange

__all__ = ["AdminHandler", "Handler"]

AdminHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

REQUEST_ID: Final = "X-Request-Id"
# A client's own request id is kept when it is short and printable; otherwise one is made.
GOOD_REQUEST_ID: Final = re.compile(r"[!-~]{1,128}")


class Handler:
    """Built once per process; aiohttp calls it for every request on the API listener."""

    def __init__(
        self,
        guard: Guard,
        routes: RouteTable,
        forwarder: Forwarder,
        pool: Pool,
        stats: Stats,
        websocket_session: websocket.Session,
        admin: Mapping[str, AdminHandler] | None,
        auth_host: userinfo.Relay,
        local: LocalExchange,
        other_hosts: mcp.Relay,
    ) -> None:
        self._guard = guard
        self._routes = routes
        self._forwarder = forwarder
        self._pool = pool
        self._stats = stats
        self._websocket_session = websocket_session
        # None: /_proxy/ is served on server.admin_listen instead.
        self._admin = admin
        self._auth_host = auth_host
        self._local = local
        self._other_hosts = other_hosts
        # Unique within the process; the random part tells processes (and restarts) apart.
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        # The server sets it at shutdown: answers then carry Connection: close.
        self.drain = Drain()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        facts = Facts(self._request_id(request))
        request[FACTS] = facts
        self._stats.in_flight += 1
        try:
            response = await self._answer(request, facts)
        finally:
            self._stats.in_flight -= 1
        if not response.prepared:
            self._decorate(request, response.headers, facts)
        return response

    async def _answer(self, request: web.BaseRequest, facts: Facts) -> web.StreamResponse:
        path, has_query, query = request.raw_path.partition("?")
        refusal = self._guard.refusal(request, path, facts)
        if refusal is not None:
            return refusal
        preflight = self._guard.preflight_answer(request)
        if preflight is not None:
            return preflight
        if path.startswith(ADMIN_PREFIX):
            return await self._own(request, path)
        matched = self._routes.match(path)
        if matched is None:
            return errors.no_route(path, self._routes.prefixes)
        route, rest = matched
        facts.route = route.name
        # Key exchanges are answered here (with a local token), never sent anywhere.
        if self._local.is_exchange(request.method, rest):
            return await self._local.answer(request, route, rest)
        local_refusal = self._local.refusal(request, route)
        if local_refusal is not None:
            return local_refusal
        # The client's routes, then the route's allow rules (or read_only), apply before any
        # token is taken; then /auth/... belongs to the auth host: userinfo relayed, the
        # rest refused.
        if not self._guard.client_may_use(facts.client, route.name):
            return errors.client_not_allowed(facts.client, route)
        if not route.allows(request.method, rest):
            return errors.not_allowed_by_route(route, request.method, rest)
        if route.policy.restricted:
            if (what := override(request, query)) is not None:
                return errors.override_on_restricted_route(route, what)
            if request.method in READ_ONLY_METHODS and request.body_exists:
                return errors.body_not_allowed(route, request.method)
        if userinfo.on_auth_host(rest):
            return await self._userinfo(request, facts, route, rest)
        target = rest + has_query + query
        if route.upstream_url is not None:
            return await self._other_host(request, facts, route, target)
        if websocket.is_upgrade(request):
            return await self._websocket(request, facts, route, target)
        return await self._forwarder.forward(request, facts, route, target, self._decorate)

    async def _own(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if self._admin is None:
            return errors.refused(
                404,
                "not_found",
                "/_proxy/ is the proxy's own: health, ready and metrics (served on "
                "server.admin_listen)",
            )
        handler = self._admin.get(path)
        if handler is None or request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            return errors.refused(
                404, "not_found", "/_proxy/ is the proxy's own: health, ready and metrics"
            )
        return await handler(request)

    async def _userinfo(
        self, request: web.BaseRequest, facts: Facts, route: Route, rest: str
    ) -> web.StreamResponse:
        # Held to the same admission as API calls, though it goes to the auth host.
        try:
            async with self._pool.slot(self._pool.calls, flow_of(route.name, rest)):
                answer = await self._auth_host.answer(request, route, rest)
        except Refused as refused:
            return refusal(self._stats, refused)
        if answer.get(ERROR_CODE) is None:  # relayed, not one of the proxy's own
            facts.upstream_status = answer.status
        return answer

    async def _other_host(
        self, request: web.BaseRequest, facts: Facts, route: Route, target: str
    ) -> web.StreamResponse:
        # MCP answers are SSE streams as often as not: each holds a long-stream slot.
        try:
            async with self._pool.slot(self._pool.streams):
                return await self._other_hosts.answer(request, facts, route, target, self._decorate)
        except Refused as refused:
            return refusal(self._stats, refused)

    async def _websocket(
        self, request: web.BaseRequest, facts: Facts, route: Route, target: str
    ) -> web.StreamResponse:
        try:
            async with self._pool.slot(self._pool.streams):
                return await websocket.relay(
                    request,
                    self._websocket_session,
                    route,
                    URL(self._forwarder.api_url + target, encoded=True),
                    request_headers(request.headers),
                    lambda headers: self._decorate(request, headers, facts),
                    self._forwarder.send_timeout,
                )
        except Refused as refused:
            return refusal(self._stats, refused)

    def _decorate(self, request: web.BaseRequest, headers: CIMultiDict[str], facts: Facts) -> None:
        headers[REQUEST_ID] = facts.request_id
        self._guard.apply_cors(request, headers)
        self.drain.mark(headers)

    def _request_id(self, request: web.BaseRequest) -> str:
        given = request.headers.get(REQUEST_ID)
        if given is not None and GOOD_REQUEST_ID.fullmatch(given):
            return given
        return f"{self._id_prefix}-{next(self._ids):x}"
