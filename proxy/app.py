"""Builds the running proxy from settings: client sessions, token sources, routes, and the
aiohttp Application that hands every request to the forwarder."""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .credentials import credential_from_settings
from .exchange import Exchanger
from .forward import Forwarder
from .guard import Guard
from .routes import Route, RouteTable
from .settings import Settings
from .tokens import Clock, RetryPolicy, TokenKey, TokenSources

__all__ = ["FORWARDER", "Upstream", "connect", "create_app"]

FORWARDER = web.AppKey("forwarder", Forwarder)


@dataclass(frozen=True, slots=True)
class Upstream:
    """Everything that talks to Appcircle, open for the lifetime of one process."""

    routes: RouteTable
    tokens: TokenSources
    api_session: aiohttp.ClientSession


def _tls(settings: Settings) -> ssl.SSLContext | bool:
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
        connector=aiohttp.TCPConnector(ssl=tls, limit=0),
        # No total: a healthy 3 GB download may take long; only silence is a timeout.
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=appcircle.connect_timeout, sock_read=appcircle.read_timeout
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    credentials = {
        name: credential_from_settings(name, credential)
        for name, credential in settings.credentials.items()
    }

    def exchanger(key: TokenKey) -> Exchanger:
        credential, sub_organization = key
        return Exchanger(
            session=auth_session,
            auth_url=appcircle.auth_url,
            credential=credentials[credential],
            sub_organization=sub_organization,
            clock=clock,
            refresh_margin=settings.tokens.refresh_margin,
        )

    tokens = TokenSources(
        exchanger, RetryPolicy(settings.tokens.retry_initial, settings.tokens.retry_max), clock
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
    try:
        yield Upstream(routes, tokens, api_session)
    finally:
        await tokens.close()
        await api_session.close()
        await auth_session.close()


async def _forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER].handle(request)


def create_app(settings: Settings, clock: Clock = time.time) -> web.Application:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        async with connect(settings, clock) as upstream:
            app[FORWARDER] = Forwarder(
                session=upstream.api_session,
                api_url=settings.appcircle.api_url,
                routes=upstream.routes,
                replay_limit=settings.tokens.replay_limit,
            )
            yield

    guard = Guard.from_settings(settings.server)
    app = web.Application(middlewares=[guard.middleware])
    app.on_response_prepare.append(guard.cors_headers)
    app.cleanup_ctx.append(lifetime)
    app.router.add_route("*", "/{path:.*}", _forward)
    return app
