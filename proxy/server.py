"""Serving: bind the listener, say where, run until SIGINT or SIGTERM, shut down cleanly."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from aiohttp import web

from . import __version__
from .app import create_app
from .settings import Settings
from .tokens import Clock

__all__ = ["serve", "start"]


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
    runner = web.AppRunner(
        create_app(settings, clock),
        # A client that hangs up cancels its handler, and so its upstream request, at once.
        handler_cancellation=True,
    )
    await runner.setup()
    listen = settings.server.endpoint
    try:
        await web.TCPSite(runner, listen.host, listen.port).start()
    except OSError as err:
        await runner.cleanup()
        raise SystemExit(
            f"appcircle-proxy: cannot listen on {listen}: {err.strerror}; "
            "choose another address with --listen or server.listen"
        ) from None
    return runner


async def _serve(settings: Settings) -> None:
    runner = await start(settings)
    try:
        for address in runner.addresses:
            host, port = address[0], address[1]
            host = f"[{host}]" if ":" in host else host
            print(f"appcircle-proxy {__version__} listening on http://{host}:{port}", flush=True)
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
