"""Serving: bind the listener, say where, run until SIGINT or SIGTERM, shut down cleanly."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import sys
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger as aiohttp_server_log

from . import __version__
from .app import create_app
from .settings import Endpoint, Settings, UnixSocket
from .tokens import Clock

__all__ = ["serve", "start"]

log = logging.getLogger("appcircle_proxy.server")


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


async def start(settings: Settings, clock: Clock = time.time) -> web.AppRunner:
    """Build the app and start listening; the caller must `cleanup()` the runner."""
    server = settings.server
    runner = web.AppRunner(
        create_app(settings, clock),
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
    )
    await runner.setup()
    aiohttp_server_log.addFilter(_QUIET_PARSER_ERRORS)
    endpoint = server.endpoint
    try:
        if isinstance(endpoint, UnixSocket):
            await _start_unix(runner, endpoint, server.socket_mode)
        else:
            await web.TCPSite(runner, endpoint.host, endpoint.port).start()
    except OSError as err:
        await runner.cleanup()
        raise SystemExit(
            f"appcircle-proxy: cannot listen on {endpoint}: {err.strerror or err}; "
            "choose another address with --listen or server.listen"
        ) from None
    if isinstance(endpoint, Endpoint) and not _is_loopback(endpoint.host):
        if server.client_secret() is None:
            log.warning(
                "LISTENING ON %s, BEYOND LOOPBACK, WITHOUT A CLIENT TOKEN: anyone who can "
                "reach this address can use the Appcircle key(s) with their full rights. "
                "Set server.client_token (or client_token_env / client_token_file), or "
                "listen on 127.0.0.1 unless this is a container's own network namespace.",
                endpoint,
            )
    return runner


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


async def _start_unix(runner: web.AppRunner, socket: UnixSocket, mode: int) -> None:
    # Created under a restrictive umask, so there is no moment when others could connect.
    previous = os.umask(0o777 & ~mode)
    try:
        await web.UnixSite(runner, str(socket.path)).start()
    finally:
        os.umask(previous)
    os.chmod(socket.path, mode)


_QUIET_PARSER_ERRORS = _ParserErrorsInOneLine()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(settings: Settings) -> None:
    runner = await start(settings)
    try:
        for address in runner.addresses:
            if isinstance(address, str):
                where = f"unix:{address}"
            else:
                host, port = address[0], address[1]
                where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            print(f"appcircle-proxy {__version__} listening on {where}", flush=True)
        print("\n".join(["routes:", *_describe_routes(settings)]), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        print("appcircle-proxy: shutting down", file=sys.stderr, flush=True)
    finally:
        await runner.cleanup()


def serve(settings: Settings) -> None:
    asyncio.run(_serve(settings))
