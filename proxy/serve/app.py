"""The composition root: builds the running proxy from settings. `connect` opens what talks
to Appcircle (the auth session, the upstream pool, the token sources, the routes); `build`
puts the request handler, statistics, access log and admin endpoints around it."""

from __future__ import annotations

import logging
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp
from yarl import URL

from ..auth.credentials import Credential, credential_from_settings
from ..auth.exchange import Exchanger
from ..auth.local_tokens import LocalTokens
from ..auth.tokens import Clock, TokenKey, TokenPolicy, TokenSources
from ..config.settings import Settings
from ..policy.guard import Guard
from ..policy.routes import Route, RouteTable
from ..telemetry.access_log import AccessLog, enabled_by_level
from ..telemetry.stats import Stats, exposition, take_snapshot
from ..telemetry.tracing import debug_traces
from ..upstream.egress import egress_proxy_for
from ..upstream.framing import HeadLimits
from ..upstream.pool import Limits, Pool
from . import mcp, userinfo
from .admin import admin_handlers
from .forward import Forwarder
from .handler import AdminHandler, Handler
from .local_exchange import LocalExchange, exchange_paths
from .runtime import Runtime
from .siblings import Siblings
from .workers import WorkerRole

__all__ = ["Proxy", "build", "connect", "upstream_url"]

log = logging.getLogger("appcircle_proxy.app")


def _tls(settings: Settings) -> ssl.SSLContext | bool:
    appcircle = settings.appcircle
    if (
        URL(appcircle.api_url).scheme == URL(appcircle.auth_url).scheme == "http"
        and appcircle.ca_file is None
        and not appcircle.insecure_skip_verify
    ):
        # No host to verify (a stand-in on loopback): loading the system's CA bundle would
        # cost a start-up 15-30 ms for nothing. (True: aiohttp's own default, never used.)
        return True
    context = ssl.create_default_context()
    if settings.appcircle.insecure_skip_verify:
        log.warning(
            "TLS VERIFICATION IS OFF (appcircle.insecure_skip_verify): anyone on the network "
            "path can impersonate the Appcircle hosts and steal the key. Use appcircle.ca_file."
        )
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif settings.appcircle.ca_file is not None:
        # Self-hosted Appcircle often sits behind a private CA; trust it in addition to the
        # system's.
        context.load_verify_locations(cafile=settings.appcircle.ca_file)
    return context


def _pool(settings: Settings, tls: ssl.SSLContext | bool) -> Pool:
    api = URL(settings.appcircle.api_url)
    appcircle = settings.appcircle
    assert api.host is not None and api.port is not None  # checked by the settings
    egress = egress_proxy_for(appcircle.api_url)
    if egress is not None:
        log.info("the API is reached through the egress proxy %s (CONNECT tunnel)", egress)
    return Pool(
        api.host,
        api.port,
        tls if api.scheme == "https" and isinstance(tls, ssl.SSLContext) else None,
        Limits(
            max_connections=appcircle.max_connections,
            max_streams=appcircle.max_streams,
            max_pending=settings.server.max_pending,
            pool_timeout=appcircle.pool_timeout,
            connect_timeout=appcircle.connect_timeout,
            read_timeout=appcircle.read_timeout,
            flow_share=appcircle.flow_share,
            response=HeadLimits(
                line=appcircle.max_response_line,
                head=appcircle.max_response_head,
                trailers=appcircle.max_response_trailers,
            ),
        ),
        egress,
    )


def upstream_url(settings: Settings, upstream: str) -> str | None:
    """A route's upstream other than the API (None: the API, through the pool)."""
    if upstream == "api":
        return None
    return settings.appcircle.mcp_url if upstream == "mcp" else upstream


@asynccontextmanager
async def connect(settings: Settings, clock: Clock = time.time) -> AsyncIterator[Runtime]:
    """Open the client sessions, the pool and the token sources; close them all on exit."""
    tls = _tls(settings)
    appcircle = settings.appcircle
    auth_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls),
        timeout=aiohttp.ClientTimeout(
            total=settings.tokens.exchange_timeout, sock_connect=appcircle.connect_timeout
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as for the forwarding client (upstream.egress).
        trust_env=True,
        trace_configs=debug_traces("auth"),  # exchange timings at --log-level debug
    )
    websocket_session = aiohttp.ClientSession(
        # Admission is the stream budget's job (appcircle.max_streams), not the connector's.
        connector=aiohttp.TCPConnector(ssl=tls, limit=0),
        # sock_read bounds the handshake's answer; aiohttp lifts it once the socket is a
        # WebSocket, so an idle WebSocket is never cut by it.
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=appcircle.connect_timeout, sock_read=appcircle.read_timeout
        ),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=True,
        trace_configs=debug_traces("websocket"),  # connection timings at debug level
    )
    pool = _pool(settings, tls)

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
                policy=route.policy,
                upstream_url=upstream_url(settings, route.upstream),
                mcp_tools=route.mcp_tools,
            )
            for name, route in settings.routes.items()
        ]
    )
    for route in routes:
        route.tokens.routes.append(route.name)
    try:
        yield Runtime(settings, routes, tokens, pool, websocket_session, make_exchanger)
    finally:
        await tokens.close()
        pool.close()
        await websocket_session.close()
        await auth_session.close()


@dataclass(frozen=True, slots=True)
class Proxy:
    """The request handler and what it reports to, around one Runtime."""

    runtime: Runtime
    handler: Handler
    stats: Stats
    access_log: AccessLog
    admin: dict[str, AdminHandler] = field(repr=False)
    # With --workers: this worker among the others, for one scrape of them all.
    siblings: Siblings | None = None


def build(
    settings: Settings,
    runtime: Runtime,
    clock: Clock = time.time,
    *,
    role: WorkerRole | None = None,
    log_stream: Callable[[], TextIO] | None = None,
) -> Proxy:
    stats = Stats()
    siblings = None
    if role is not None and role.metrics_dir is not None:
        siblings = Siblings(
            role.metrics_dir,
            role.index,
            role.restarts,
            lambda: take_snapshot(stats, runtime, clock),
        )

    async def metrics() -> tuple[bytes, str]:
        if siblings is None:
            return exposition(take_snapshot(stats, runtime, clock))
        return exposition(*await siblings.gather())

    admin = admin_handlers(lambda: runtime, metrics)
    access_log = AccessLog(
        log_stream or (lambda: sys.stderr),
        settings.log.format,
        query_strings=settings.log.query_strings,
        worker=None if role is None else role.index,
        enabled=enabled_by_level(),
    )
    forwarder = Forwarder(
        settings.appcircle.api_url,
        runtime.pool,
        stats,
        replay_limit=settings.tokens.replay_limit,
        body_timeout=settings.server.body_timeout,
        send_timeout=settings.server.send_timeout,
    )
    local_tokens = LocalTokens(clock)
    guard = Guard.from_settings(settings, exchange_paths(runtime.routes), local_tokens)
    handler = Handler(
        guard,
        runtime.routes,
        forwarder,
        runtime.pool,
        stats,
        runtime.session,
        admin if settings.server.admin_listen is None else None,
        # aiohttp's client (not the pool, which carries the API only) to the auth host.
        userinfo.Relay(
            runtime.session, settings.appcircle.auth_url, settings.tokens.exchange_timeout
        ),
        LocalExchange(runtime.routes, local_tokens, guard.clients),
        mcp.Relay(runtime.session, settings.server.send_timeout),
    )
    return Proxy(runtime, handler, stats, access_log, admin, siblings)
