"""Builds the running proxy from settings: client sessions, token sources, routes, and the
aiohttp Application that hands every request to the forwarder."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from . import admin, errors
from .credentials import Credential, credential_from_settings
from .exchange import Exchanger
from .forward import Forwarder
from .guard import Guard
from .observe import Metrics
from .routes import Route, RouteTable
from .settings import Settings
from .tokens import Clock, TokenKey, TokenPolicy, TokenSources

__all__ = [
    "FORWARDER",
    "METRICS",
    "UPSTREAM",
    "Upstream",
    "connect",
    "create_app",
]

log = logging.getLogger("appcircle_proxy.app")


class Upstream:
    """Everything that talks to Appcircle, open for the lifetime of one process."""

    def __init__(
        self,
        settings: Settings,
        routes: RouteTable,
        tokens: TokenSources,
        api_session: aiohttp.ClientSession,
        make_exchanger: Callable[[Mapping[str, Credential], TokenKey], Exchanger],
    ) -> None:
        self.settings = settings
        self.routes = routes
        self.tokens = tokens
        self.api_session = api_session
        self._make_exchanger = make_exchanger

    def reload(self, new: Settings) -> None:
        """Take up changed credentials (and rotated secret files) without a restart: a
        changed key is exchanged at once; its route's token serves until that succeeds."""
        credentials = {
            name: credential_from_settings(name, credential)
            for name, credential in new.credentials.items()
        }
        for source in self.tokens:
            name = source.key[0]
            if name not in credentials:
                log.warning("reload: credential '%s' is gone; restart to remove its routes", name)
                continue
            # Reload semantics (keep the running token until the new key works) live in tokens.
            source.stage(self._make_exchanger(credentials, source.key))
        untouched = ("server", "appcircle", "tokens", "log", "routes")
        if any(getattr(new, part) != getattr(self.settings, part) for part in untouched):
            log.warning(
                "reload: only credentials and secret files are reloaded; restart the proxy "
                "to apply changes to %s",
                ", ".join(p for p in untouched if getattr(new, p) != getattr(self.settings, p)),
            )
        self.settings = self.settings.model_copy(update={"credentials": new.credentials})


UPSTREAM = web.AppKey("upstream", Upstream)
FORWARDER = web.AppKey("forwarder", Forwarder)
METRICS = web.AppKey("metrics", Metrics)


def _tls(settings: Settings) -> ssl.SSLContext | bool:
    if settings.appcircle.insecure_skip_verify:
        log.warning(
            "TLS VERIFICATION IS OFF (appcircle.insecure_skip_verify): anyone on the network "
            "path can impersonate the Appcircle hosts and steal the key. Use appcircle.ca_file."
        )
        return False
    if settings.appcircle.ca_file is None:
        return True
    # Self-hosted Appcircle often sits behind a private CA; trust it in addition to the system's.
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=settings.appcircle.ca_file)
    return context


@asynccontextmanager
async def connect(settings: Settings, clock: Clock = time.time) -> AsyncIterator[Upstream]:
    """Open the client sessions and token sources; close them all on exit."""
    tls = _tls(settings)
    appcircle = settings.appcircle
    auth_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls),
        timeout=aiohttp.ClientTimeout(
            total=settings.tokens.exchange_timeout, sock_connect=appcircle.connect_timeout
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    api_session = aiohttp.ClientSession(
        # A full pool makes requests wait for a connection; they are not refused.
        connector=aiohttp.TCPConnector(ssl=tls, limit=appcircle.max_connections),
        # No total: a healthy 3 GB download may take long; only silence is a timeout.
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=appcircle.connect_timeout, sock_read=appcircle.read_timeout
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )

    def make_exchanger(credentials: Mapping[str, Credential], key: TokenKey) -> Exchanger:
        credential, sub_organization = key
        return Exchanger(
            session=auth_session,
            auth_url=appcircle.auth_url,
            credential=credentials[credential],
            sub_organization=sub_organization,
            clock=clock,
            refresh_margin=settings.tokens.refresh_margin,
        )

    credentials = {
        name: credential_from_settings(name, credential)
        for name, credential in settings.credentials.items()
    }
    tokens = TokenSources(
        lambda key: make_exchanger(credentials, key),
        TokenPolicy.from_settings(settings.tokens),
        clock,
    )
    routes = RouteTable(
        [
            Route(
                name=name,
                prefix=route.prefix,
                credential=credentials[route.credential],
                sub_organization=route.sub_organization,
                tokens=tokens.for_key((route.credential, route.sub_organization)),
            )
            for name, route in settings.routes.items()
        ]
    )
    for route in routes:
        route.tokens.routes.append(route.name)
    try:
        yield Upstream(settings, routes, tokens, api_session, make_exchanger)
    finally:
        await tokens.close()
        await api_session.close()
        await auth_session.close()


async def _forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER].handle(request)


async def _not_forwarded(request: web.Request) -> web.Response:
    return errors.refused(
        404,
        "not_found",
        "/_proxy/ is the proxy's own: health, ready and metrics"
        + (" (served on server.admin_listen)" if admin.ON_ADMIN_LISTENER in request.app else ""),
    )


def create_app(settings: Settings, clock: Clock = time.time) -> web.Application:
    """The proxy's application; its startup opens the Upstream, its cleanup closes it."""

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        async with connect(settings, clock) as upstream:
            app[UPSTREAM] = upstream
            app[FORWARDER] = Forwarder(
                session=upstream.api_session,
                api_url=settings.appcircle.api_url,
                routes=upstream.routes,
                replay_limit=settings.tokens.replay_limit,
            )
            if settings.server.eager:
                for source in upstream.tokens:
                    source.start()
            yield

    def upstream_now() -> Upstream | None:
        return app.get(UPSTREAM)

    guard = Guard.from_settings(settings.server)
    metrics = Metrics(upstream_now, clock)
    # Metrics outermost, so refused requests are counted too.
    app = web.Application(middlewares=[metrics.middleware, guard.middleware])
    app[METRICS] = metrics
    app.on_response_prepare.append(guard.cors_headers)
    app.cleanup_ctx.append(lifetime)
    if settings.server.admin_listen is None:
        admin.add_routes(app.router, upstream_now, metrics)
    else:
        app[admin.ON_ADMIN_LISTENER] = True
    app.router.add_route("*", "/_proxy/{path:.*}", _not_forwarded)
    app.router.add_route("*", "/{path:.*}", _forward)
    return app
