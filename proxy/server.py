"""Serving: bind the listeners, say where, run until SIGINT or SIGTERM and drain in-flight
requests; reload credentials on SIGHUP."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TextIO

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger as aiohttp_server_log

from . import __version__
from .access_log import LOGGER_NAME, access_logger
from .admin import create_admin_server
from .app import Proxy, build, connect
from .settings import ConfigError, Endpoint, Settings, UnixSocket
from .tokens import Clock

__all__ = ["Running", "serve", "start"]

log = logging.getLogger("appcircle_proxy.server")

_LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None
try:
    import uvloop

    _LOOP_FACTORY = uvloop.new_event_loop
except ImportError:  # no uvloop on Windows: the standard loop serves as well, a bit slower
    _LOOP_FACTORY = None


def _describe_routes(settings: Settings) -> list[str]:
    lines = []
    for name, route in sorted(settings.routes.items(), key=lambda item: item[1].prefix):
        credential = settings.credentials[route.credential]
        organization = route.sub_organization or "the key's own organization"
        lines.append(
            f"  {route.prefix:<12} -> {settings.appcircle.api_url}  (route '{name}', "
            f"credential '{route.credential}' [{credential.kind}], {organization})"
        )
    return lines


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
    """A started proxy: its parts and its listeners (the API one first)."""

    proxy: Proxy
    runners: tuple[web.BaseRunner, ...]
    resources: AsyncExitStack

    @property
    def urls(self) -> list[str]:
        """Where the API listener listens, as URLs (unix:/path for a Unix socket)."""
        return [_url(address) for address in self.runners[0].addresses]

    @property
    def admin_urls(self) -> list[str]:
        return [_url(address) for runner in self.runners[1:] for address in runner.addresses]

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_timeout), close."""
        try:
            for runner in reversed(self.runners):
                await runner.cleanup()
        finally:
            self.proxy.access_log.flush()
            await self.resources.aclose()


def _url(address: object) -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    assert isinstance(address, tuple)
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start(
    settings: Settings,
    clock: Clock = time.time,
    *,
    reuse_port: bool = False,
    worker: int | None = None,
    log_stream: Callable[[], TextIO] | None = None,
) -> Running:
    """Build the proxy and start its listeners; the caller must `stop()` it. With
    `reuse_port`, several processes can listen on the same TCP port (SO_REUSEPORT)."""
    server = settings.server
    resources = AsyncExitStack()
    runtime = await resources.enter_async_context(connect(settings, clock))
    proxy = build(settings, runtime, clock, worker=worker, log_stream=log_stream)
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
        # The parser's own limits sit above the guard's, so that the guard can answer
        # 414/431 with a reason; beyond them the parser answers 400.
        max_line_size=server.max_url_length + 64,
        max_field_size=server.max_header_bytes,
        max_headers=server.max_header_count * 2 + 32,
        access_log_class=access_logger(proxy.access_log, proxy.stats),
        access_log=logging.getLogger(LOGGER_NAME),
    )
    runner = web.ServerRunner(web_server, shutdown_timeout=server.shutdown_timeout)
    aiohttp_server_log.addFilter(_QUIET_PARSER_ERRORS)
    runners: list[web.BaseRunner] = [runner]
    try:
        await runner.setup()
        await _listen(runner, server.endpoint, server.socket_mode, reuse_port)
        if server.admin_endpoint is not None:
            admin_runner = web.ServerRunner(create_admin_server(proxy.admin))
            runners.append(admin_runner)
            await admin_runner.setup()
            await _listen(admin_runner, server.admin_endpoint, server.socket_mode, reuse_port)
    except OSError as err:
        for started in reversed(runners):
            await started.cleanup()
        await resources.aclose()
        raise SystemExit(
            f"appcircle-proxy: cannot listen ({err.strerror or err}); choose other addresses "
            "with --listen, server.listen or server.admin_listen"
        ) from None
    endpoint = server.endpoint
    if isinstance(endpoint, Endpoint) and not _is_loopback(endpoint.host):
        if server.client_secret() is None:
            log.warning(
                "LISTENING ON %s, BEYOND LOOPBACK, WITHOUT A CLIENT TOKEN: anyone who can "
                "reach this address can use the Appcircle key(s) with their full rights. "
                "Set server.client_token (or client_token_env / client_token_file), or "
                "listen on 127.0.0.1 unless this is a container's own network namespace.",
                endpoint,
            )
    return Running(proxy, tuple(runners), resources)


async def _listen(
    runner: web.BaseRunner, endpoint: Endpoint | UnixSocket, mode: int, reuse_port: bool
) -> None:
    if isinstance(endpoint, Endpoint):
        await web.TCPSite(runner, endpoint.host, endpoint.port, reuse_port=reuse_port).start()
        return
    # Created under a restrictive umask, so there is no moment when others could connect.
    previous = os.umask(0o777 & ~mode)
    try:
        await web.UnixSite(runner, str(endpoint.path)).start()
    finally:
        os.umask(previous)
    os.chmod(endpoint.path, mode)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reload(running: Running, load: Callable[[], Settings]) -> None:
    log.info("SIGHUP: reloading credentials")
    try:
        settings = load()
    except ConfigError as err:
        log.error("reload failed, keeping the running configuration: %s", err)
        return
    running.proxy.runtime.reload(settings)


async def _serve(
    settings: Settings, load: Callable[[], Settings], *, worker: int | None = None
) -> None:
    running = await start(settings, reuse_port=worker is not None, worker=worker)
    # Everything allocated so far lives as long as the process: keep the collector off it.
    gc.collect()
    gc.freeze()
    try:
        if not worker:  # the only process, or the first of several
            for url in running.urls:
                print(f"appcircle-proxy {__version__} listening on {url}", flush=True)
            for url in running.admin_urls:
                print(f"health, readiness and metrics on {url}/_proxy/", flush=True)
            print("\n".join(["routes:", *_describe_routes(settings)]), flush=True)
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
        await running.stop()
    if not worker:
        print("appcircle-proxy: stopped", file=sys.stderr, flush=True)


def _run(main: Coroutine[None, None, None]) -> None:
    # uvloop's event loop (libuv), where installed, forwards 10-25% more per second.
    with asyncio.Runner(loop_factory=_LOOP_FACTORY) as runner:
        runner.run(main)


def _worker(settings: Settings, load: Callable[[], Settings], index: int) -> None:
    # The parent relays SIGINT/SIGTERM; a terminal's Ctrl-C must not hit workers directly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _run(_serve(settings, load, worker=index))


def serve(settings: Settings, load: Callable[[], Settings], workers: int = 1) -> int:
    """Run until SIGINT/SIGTERM; `load` re-reads the configuration on SIGHUP. With several
    workers, each is a process of its own on the same port, with its own token cache."""
    if workers == 1:
        _run(_serve(settings, load))
        return 0
    endpoint = settings.server.endpoint
    if not isinstance(endpoint, Endpoint) or endpoint.port == 0:
        print(
            "appcircle-proxy: --workers needs a fixed TCP port to share (server.listen)",
            file=sys.stderr,
        )
        return 2
    # fork, not spawn: the workers inherit the validated settings and the loader as they are.
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_worker, args=(settings, load, index), name=f"worker-{index}")
        for index in range(workers)
    ]
    for process in processes:
        process.start()

    def relay(signum: int, _frame: object) -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, relay)
    for process in processes:
        process.join()
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        print(f"appcircle-proxy: {', '.join(failed)} exited with an error", file=sys.stderr)
        return 1
    return 0
