"""Serving, start to stop: build the proxy, start its listeners, say where, run until SIGINT
or SIGTERM and drain in-flight requests within shutdown_timeout; reload on SIGHUP. The
sockets are `listeners`'; the --workers supervisor is `workers`'."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Final, TextIO

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger as aiohttp_server_log

from .. import __version__
from ..auth.tokens import Clock
from ..config.addresses import Endpoint, is_loopback
from ..config.errors import ConfigError
from ..config.hardening import secrets_in_environment, withhold
from ..config.secrets import listener_tls, load_listener_certificate, read_clients
from ..config.settings import Settings
from ..telemetry import logs
from ..telemetry.access_log import LOGGER_NAME, access_logger
from .admin import create_admin_server
from .app import Proxy, build, connect, upstream_url
from .inbound import Connections, head_limit
from .listeners import Bound, Listener, addresses, bind, listen, why
from .memory import give_back_after_streams
from .workers import Supervisor, WorkerRole

__all__ = ["Running", "serve", "start"]

log = logging.getLogger("appcircle_proxy.server")

# Once shutdown_timeout is spent, requests still running are cancelled and given this long
# to unwind (aiohttp waits twice: for the handler, then for its cancellation).
CUT_GRACE: Final = 0.1
GC_FIRST_GENERATION: Final = 10_000


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    # Imported here, not at the top: `run` and the tools use asyncio's own loop and need not
    # pay for importing it.
    try:
        import uvloop
    except ImportError:  # no uvloop on Windows: the standard loop serves as well, a bit slower
        return None
    return uvloop.new_event_loop


def _describe_routes(settings: Settings) -> list[dict[str, str | None]]:
    return [
        {
            "route": name,
            "prefix": route.prefix,
            "credential": route.credential,
            "kind": settings.credentials[route.credential].kind,
            "sub_organization": route.sub_organization,
            "upstream": upstream_url(settings, route.upstream) or settings.appcircle.api_url,
        }
        for name, route in sorted(settings.routes.items(), key=lambda item: item[1].prefix)
    ]


def _announce(running: Running, settings: Settings, *, banner: bool) -> None:
    """The `listening` event: where, and which routes; in text, with `banner`, the lines
    people read (once, not once per worker)."""
    routes = _describe_routes(settings)
    lines = [f"appcircle-proxy {__version__} listening on {url}" for url in running.urls]
    lines += [f"health, readiness and metrics on {url}/_proxy/" for url in running.admin_urls]
    lines.append("routes:")
    for route in routes:
        organization = route["sub_organization"] or "the key's own organization"
        lines.append(
            f"  {route['prefix']:<12} -> {route['upstream']}  (route '{route['route']}', "
            f"credential '{route['credential']}' [{route['kind']}], {organization})"
        )
    logs.event(
        "listening",
        # The address is followed by a space, for scripts that take the word after "on".
        f"listening on {' '.join(running.urls)} (appcircle-proxy {__version__})",
        {
            "version": __version__,
            "address": running.urls[0],
            "admin_address": running.admin_urls[0] if running.admin_urls else None,
            "api_url": settings.appcircle.api_url,
            "routes": routes,
        },
        "\n".join(lines) if banner else None,
    )


def _final_counts(running: Running) -> dict[str, int]:
    """What this process did, for the `stopped` event."""
    sources = list(running.proxy.runtime.tokens)
    exchanges = sum(sum(source.outcomes.values()) for source in sources)
    return {
        "requests": sum(running.proxy.stats.requests.values()),
        "token_exchanges": exchanges,
        "token_exchange_failures": exchanges - sum(source.outcomes["ok"] for source in sources),
    }


class _ParserErrorsInOneLine(logging.Filter):
    """aiohttp logs every malformed request with a traceback; a hostile or broken client
    is not a server error. Keep one line, at info level, naming the client and the fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            error = record.exc_info[1]
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request from %s: %s"
            record.args = (remote, str(error.message).strip())
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_QUIET_PARSER_ERRORS = _ParserErrorsInOneLine()


@dataclass(frozen=True, slots=True)
class Running:
    """A started proxy: its parts, its runners and listeners (the API ones first)."""

    proxy: Proxy
    runners: tuple[web.BaseRunner, ...]
    resources: AsyncExitStack
    listeners: tuple[tuple[Listener, ...], ...]
    shutdown_timeout: float
    # The API listener's TLS context, which SIGHUP loads the certificate into again.
    tls: ssl.SSLContext | None = None

    @property
    def urls(self) -> list[str]:
        """Where the API listener listens, as URLs (unix:/path for a Unix socket)."""
        return addresses(self.listeners[0])

    @property
    def admin_urls(self) -> list[str]:
        return [url for listeners in self.listeners[1:] for url in addresses(listeners)]

    async def stop(self) -> int:
        """Stop accepting and let in-flight requests finish, all within shutdown_timeout;
        cancel those still running then, and close. Returns how many were cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, self.shutdown_timeout - CUT_GRACE)
        self.proxy.handler.drain.draining = True
        for listeners in self.listeners:
            for listener in listeners:
                listener.close()
        server = self.runners[0].server
        cut = 0
        try:
            if server is not None:
                # Idle keep-alive connections end now; busy ones after their answer.
                server.pre_shutdown()
                stats = self.proxy.stats
                while stats.in_flight and loop.time() < deadline:
                    await asyncio.sleep(0.02)
                cut = stats.in_flight
            for runner in reversed(self.runners):
                await runner.cleanup()
        finally:
            self.proxy.access_log.flush()
            await self.resources.aclose()
        return cut


async def start(
    settings: Settings,
    clock: Clock = time.time,
    *,
    bound: tuple[Bound, ...] | None = None,
    role: WorkerRole | None = None,
    log_stream: Callable[[], TextIO] | None = None,
) -> Running:
    """Build the proxy and start its listeners; the caller must `stop()` it. A worker is
    given the sockets its supervisor `bound`; otherwise they are bound here."""
    server = settings.server
    resources = AsyncExitStack()
    runtime = await resources.enter_async_context(connect(settings, clock))
    proxy = build(settings, runtime, clock, role=role, log_stream=log_stream)
    if proxy.siblings is not None:
        await proxy.siblings.start()
        resources.push_async_callback(proxy.siblings.close)
    give_back = asyncio.get_running_loop().create_task(
        give_back_after_streams(runtime.pool.streams), name="give back memory"
    )
    resources.push_async_callback(_cancel, give_back)
    if server.eager:
        for source in runtime.tokens:
            source.start()
    web_server = web.Server(
        proxy.handler,
        # A client that hangs up cancels its handler, and so its upstream request, at once.
        handler_cancellation=True,
        # aiohttp closes a connection that has not sent a whole request head within this
        # time (slowloris), as well as an idle keep-alive connection.
        keepalive_timeout=server.header_timeout,
        # The parser's own limits, enforced as the head is read, sit above the guard's, so
        # that the guard can answer 414/431 with a reason; beyond them the parser answers
        # 400. The head as a whole is bounded by `inbound.Connections`.
        max_line_size=server.max_url_length + 64,
        max_field_size=server.max_header_bytes,
        max_headers=server.max_header_count * 2 + 32,
        access_log_class=access_logger(proxy.access_log, proxy.stats),
        access_log=logging.getLogger(LOGGER_NAME),
    )
    # Stop() drains within shutdown_timeout itself; what remains then is cut.
    runner = web.ServerRunner(web_server, shutdown_timeout=CUT_GRACE)
    aiohttp_server_log.addFilter(_QUIET_PARSER_ERRORS)
    connections = Connections(
        limit=server.max_client_connections,
        head_limit=head_limit(server.max_url_length, server.max_header_bytes),
    )
    runners: list[web.BaseRunner] = [runner]
    listeners: list[tuple[Listener, ...]] = []
    address, setting = server.endpoint, "--listen or server.listen"
    owned = bound is None
    try:
        # Checked when the settings were loaded; read here, once more, for this process.
        tls = listener_tls(server)
    except ValueError as err:
        await resources.aclose()
        log.error("%s", err)
        raise SystemExit(2) from None
    try:
        if bound is None:
            bound = bind(server)
        await runner.setup()
        listeners.append(await listen(runner, connections, bound[0], owned=owned, tls=tls))
        if server.admin_endpoint is not None:
            address, setting = server.admin_endpoint, "--admin-listen or server.admin_listen"
            admin_runner = web.ServerRunner(
                create_admin_server(proxy.admin), shutdown_timeout=CUT_GRACE
            )
            runners.append(admin_runner)
            await admin_runner.setup()
            # Probes and scrapers keep their own budget: a flood on the API listener must
            # not make the proxy look dead.
            admin_connections = Connections(limit=64, head_limit=connections.head_limit)
            listeners.append(await listen(admin_runner, admin_connections, bound[1], owned=owned))
    except (OSError, SystemExit) as err:
        for group in listeners:
            for listener in group:
                listener.close()
        if owned and bound is not None:
            for made in bound:
                made.close()
        for started in reversed(runners):
            await started.cleanup()
        await resources.aclose()
        if isinstance(err, SystemExit):  # a Unix socket path refused, already said why
            raise
        log.error("cannot listen on %s: %s; choose another with %s", address, why(err), setting)
        raise SystemExit(2) from None
    endpoint = server.endpoint
    if isinstance(endpoint, Endpoint) and not is_loopback(endpoint.host):
        if not read_clients(settings):
            log.warning(
                "LISTENING ON %s, BEYOND LOOPBACK, WITHOUT A CLIENT TOKEN: anyone who can "
                "reach this address can use the Appcircle key(s) with their full rights. "
                "Set server.client_token (or client_token_env / client_token_file) or "
                "[clients.NAME], or "
                "listen on 127.0.0.1 unless this is a container's own network namespace.",
                endpoint,
            )
    return Running(proxy, tuple(runners), resources, tuple(listeners), server.shutdown_timeout, tls)


def _reload(running: Running, load: Callable[[], Settings]) -> None:
    log.info("SIGHUP: reloading credentials")
    with secrets_in_environment():
        try:
            settings = load()
        except ConfigError as err:
            log.error("reload failed, keeping the running configuration: %s", err)
            return
        running.proxy.runtime.reload(settings)
    withhold(settings)
    if running.tls is not None and settings.server.tls_cert_file is not None:
        # Loaded already by the settings' check; the same context, so every connection
        # accepted from now on gets the new certificate and the open ones keep theirs.
        try:
            load_listener_certificate(running.tls, settings.server)
        except ValueError as err:
            log.error("reload of the listener's certificate failed, keeping the old: %s", err)
            return
        log.info("SIGHUP: reloaded the listener's TLS certificate")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _serve(
    settings: Settings,
    load: Callable[[], Settings],
    role: WorkerRole | None = None,
    bound: tuple[Bound, ...] | None = None,
) -> None:
    with secrets_in_environment():
        running = await start(settings, bound=bound, role=role)
    # Read: the variables a key came from leave the environment (back for a reload only).
    withhold(settings)
    started = time.monotonic()
    # Everything allocated so far lives as long as the process: keep the collector off it.
    gc.collect()
    gc.freeze()
    # A request allocates a few hundred containers (tasks, futures, headers), nearly all
    # freed by reference counting when it ends. With the default first generation of 700,
    # collections run every few requests and promote the objects of requests in flight;
    # 10,000 runs them a tenth as often (measured: 3-5% less CPU per small request). What
    # it lets wait is at most 10,000 objects of cyclic garbage; the older generations keep
    # their default cadence (every 10 of the younger one's collections).
    gc.set_threshold(GC_FIRST_GENERATION, 10, 10)
    try:
        # The banner once: from the only process, or the first worker's first start.
        _announce(
            running, settings, banner=role is None or (role.index == 0 and role.restarts == 0)
        )
        if role is not None:
            if role.restarts:
                log.warning(
                    "worker %d serving again (pid %d), restart %d of this worker",
                    role.index,
                    os.getpid(),
                    role.restarts,
                )
            role.ready.send_bytes(b"serving")
            role.ready.close()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reload, running, load)
        await stop.wait()
        log.info(
            "shutting down: no new connections; in-flight requests get up to %.0f s",
            settings.server.shutdown_timeout,
        )
    finally:
        cut = await running.stop()
    if cut:
        log.warning(
            "shutdown_timeout (%.0f s) reached: cut %d request(s) still in flight",
            settings.server.shutdown_timeout,
            cut,
        )
    else:
        log.info("drained: every in-flight request finished")
    counts = _final_counts(running)
    uptime = time.monotonic() - started
    logs.event(
        "stopped",
        f"appcircle-proxy: stopped after {counts['requests']} requests and "
        f"{counts['token_exchanges']} token exchanges "
        f"({counts['token_exchange_failures']} failed), up {uptime:.0f} s",
        {**counts, "uptime_s": round(uptime, 1)},
    )


def _run(main: Coroutine[None, None, None]) -> None:
    # uvloop's event loop (libuv), where installed, forwards 10-25% more per second.
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main)


def _worker(
    bound: tuple[Bound, ...], settings: Settings, load: Callable[[], Settings], role: WorkerRole
) -> None:
    # The parent relays SIGINT/SIGTERM; a terminal's Ctrl-C must not hit workers directly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent's handlers were inherited; until the worker's event loop installs its own,
    # SIGTERM ends it and SIGHUP (nothing to reload yet) is ignored.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _run(_serve(settings, load, role, bound))


def serve(settings: Settings, load: Callable[[], Settings], workers: int = 1) -> int:
    """Run until SIGINT/SIGTERM; `load` re-reads the configuration on SIGHUP. With several
    workers, each is a process of its own, with its own token cache, serving the sockets
    the supervisor bound once (so a second instance on the address exits 2, as one
    process does)."""
    if workers == 1:
        _run(_serve(settings, load))
        return 0
    endpoint, admin = settings.server.endpoint, settings.server.admin_endpoint
    if not isinstance(endpoint, Endpoint) or endpoint.port == 0:
        log.error("--workers needs a fixed TCP port to share (server.listen)")
        return 2
    if admin is not None and not isinstance(admin, Endpoint):
        log.error("--workers needs a TCP address for server.admin_listen, not a Unix socket")
        return 2
    bound = bind(settings.server)
    # Each worker reads them back while it starts, from the copy fork gives it.
    withhold(settings)
    try:
        return Supervisor(settings, load, workers, functools.partial(_worker, bound)).run()
    finally:
        for made in bound:
            made.close()
