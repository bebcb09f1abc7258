"""CI lifecycles: `run -- CMD` serves the proxy for one command's lifetime and keeps the key
out of the command's environment; `wait` blocks until a proxy started elsewhere is ready.

`run` is the whole job step in one process: start the proxy on a free loopback port, wait
until every route holds a session token, run CMD with APPCIRCLE_PROXY_URL pointing at it and
without the variables the key came from, pass signals on, then drain and stop, exiting with
CMD's status. CMD's environment holds no key, and the proxy (non-dumpable, see
`config.hardening`) cannot be read by it; the step's own shell, which received the key,
still holds it: README, CI jobs, says what that leaves open.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
from yarl import URL

from ..config.addresses import Endpoint, UnixSocket, probe_target, reachable
from ..config.errors import ConfigError
from ..config.hardening import key_variables, withhold
from ..config.load import load_settings
from ..config.secrets import read_client_token
from ..config.settings import Settings
from ..config.variables import refuse_unknown_setting_variables
from ..policy.routes import Route
from ..serve.server import start
from ..telemetry import logs
from .probe import checked_url

__all__ = ["child_environment", "run", "wait"]

# What CMD is given: the proxy (with the route's prefix), and its client token if it has one.
PROXY_URL_ENV: Final = "APPCIRCLE_PROXY_URL"
API_URL_ENV: Final = "APPCIRCLE_API_URL"
CLIENT_TOKEN_ENV: Final = "APPCIRCLE_PROXY_CLIENT_TOKEN"
# The name `run` and `wait` used before 0.2: still given and read, with a deprecation line.
OLD_CLIENT_TOKEN_ENV: Final = "APPCIRCLE_PROXY_TOKEN"
RUN_LISTEN: Final = "127.0.0.1:0"
READY_PATH: Final = "/_proxy/ready"
# Failures that retrying within the timeout cannot mend: report them at once.
PERMANENT_FAILURES: Final = frozenset(
    {"key_rejected", "bad_request", "wrong_organization", "secret_unavailable"}
)
FORWARDED_SIGNALS: Final = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
DEFAULT_TIMEOUT: Final = 60.0
WAIT_POLL_SECONDS: Final = 0.2
WAIT_REQUEST_SECONDS: Final = 2.0


# -- run --------------------------------------------------------------------------------


def child_environment(
    settings: Settings, environ: Mapping[str, str], proxy_url: str
) -> dict[str, str]:
    """CMD's environment: ours without the key variables, with the proxy's URL (and its
    client token, which only opens this proxy, for as long as CMD runs)."""
    dropped = key_variables(settings, environ)
    environment = {name: value for name, value in environ.items() if name not in dropped}
    environment[PROXY_URL_ENV] = environment[API_URL_ENV] = proxy_url
    client_token = read_client_token(settings.server)
    if client_token is not None:
        environment[CLIENT_TOKEN_ENV] = client_token.get_secret_value()
        environment[OLD_CLIENT_TOKEN_ENV] = client_token.get_secret_value()
    return environment


def run(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """`appcircle-proxy run`; `overrides` are the command line's settings flags."""
    given: list[str] = getattr(args, "cmd", [])
    command = given[1:] if given[:1] == ["--"] else given
    timeout: float = getattr(args, "timeout", DEFAULT_TIMEOUT)
    route_name: str | None = getattr(args, "route", None)
    if not command:
        raise ConfigError(
            "run: name the command after --, e.g. appcircle-proxy run -- appcircle build "
            "profile list"
        )
    if timeout <= 0:
        raise ConfigError("run: --timeout must be more than 0 seconds")
    overrides.setdefault("server", {}).setdefault("listen", RUN_LISTEN)
    settings = load_settings(getattr(args, "config", None), overrides)
    if route_name is not None and route_name not in settings.routes:
        raise ConfigError(
            f"run: no route named '{route_name}'; configured routes: "
            f"{', '.join(sorted(settings.routes))}"
        )
    logs.configure(settings.log)
    return asyncio.run(_run(settings, command, route_name, timeout))


async def _run(
    settings: Settings, command: list[str], route_name: str | None, timeout: float
) -> int:
    running = await start(settings)
    try:
        routes = running.proxy.runtime.routes
        problems = await _tokens_for_every_route(list(routes), timeout)
        if problems:
            logs.NOTICES.error(
                "not running %s: %d route(s) have no session token: %s",
                command[0],
                len(problems),
                "; ".join(f"route '{name}': {why}" for name, why in sorted(problems.items())),
                extra={"fields": {"event": "not_running", "routes": problems}},
            )
            return 1
        url = _client_url(running.urls[0])
        if route_name is not None:
            route = routes.by_name(route_name)
            assert route is not None  # checked against the settings before starting
            url += "" if route.prefix == "/" else route.prefix
        logs.NOTICES.info(
            "serving %s for %s",
            url,
            shlex.join(command),
            extra={"fields": {"event": "serving", "url": url, "command": command}},
        )
        environment = child_environment(settings, os.environ, url)
        # Read and used: they leave this process's environment before CMD starts.
        withhold(settings)
        return await _child(command, environment)
    finally:
        # Drains requests still in flight (a background job of CMD's), then closes.
        await running.stop()


async def _tokens_for_every_route(routes: list[Route], timeout: float) -> dict[str, str]:
    """Wait until every route holds a token; the problem of each that does not, else {}."""
    for route in routes:
        route.tokens.start()
    deadline = time.monotonic() + timeout
    while True:
        waiting = [route for route in routes if route.tokens.current() is None]
        if not waiting:
            return {}
        hopeless = {
            route.name: route.tokens.failure.detail
            for route in waiting
            if route.tokens.failure is not None and route.tokens.failure.kind in PERMANENT_FAILURES
        }
        if hopeless:
            return hopeless
        if time.monotonic() >= deadline:
            return {
                route.name: (
                    route.tokens.failure.detail
                    if route.tokens.failure is not None
                    else f"no answer from the auth host within {timeout:g} s"
                )
                for route in waiting
            }
        # Woken by the next outcome of any route still waiting, not by polling: a start
        # that takes one exchange should take no longer than it.
        outcomes = [route.tokens.next_outcome() for route in waiting]
        try:
            await asyncio.wait(
                outcomes,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for outcome in outcomes:
                outcome.cancel()


async def _child(command: list[str], environment: dict[str, str]) -> int:
    try:
        child = await asyncio.create_subprocess_exec(*command, env=environment)
    except OSError as err:
        logs.NOTICES.error("cannot run %s: %s", command[0], err.strerror or err)
        # The shell's convention: 127 not found, 126 found but not runnable.
        return 127 if isinstance(err, FileNotFoundError) else 126
    loop = asyncio.get_running_loop()
    # At a terminal, Ctrl-C already reaches CMD (it shares our process group); passing it on
    # too would interrupt CMD twice. Everything else, and SIGINT from `kill`, is passed on.
    at_terminal = _in_terminal_foreground()

    def forward(signum: int) -> None:
        if child.returncode is None:
            child.send_signal(signum)

    for signum in FORWARDED_SIGNALS:
        if signum == signal.SIGINT and at_terminal:
            loop.add_signal_handler(signum, lambda: None)
        else:
            loop.add_signal_handler(signum, forward, signum)
    try:
        status = await child.wait()
    finally:
        for signum in FORWARDED_SIGNALS:
            loop.remove_signal_handler(signum)
    # Killed by a signal: report it as a shell would, 128 + its number.
    return status if status >= 0 else 128 - status


def _in_terminal_foreground() -> bool:
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def _client_url(listening: str) -> str:
    """Where a local client reaches a listener: the wildcard addresses by loopback."""
    url = URL(listening)
    if url.host is None or url.port is None:
        return listening
    return reachable(Endpoint(url.host, url.port)).url


# -- wait -------------------------------------------------------------------------------


def given_client_token(environ: Mapping[str, str]) -> str | None:
    """The client token a probe sends to a proxy named by --url, from CLIENT_TOKEN_ENV (or,
    deprecated, OLD_CLIENT_TOKEN_ENV)."""
    if token := environ.get(CLIENT_TOKEN_ENV, "").strip():
        return token
    if token := environ.get(OLD_CLIENT_TOKEN_ENV, "").strip():
        print(
            f"appcircle-proxy: {OLD_CLIENT_TOKEN_ENV} is deprecated; name the client token "
            f"{CLIENT_TOKEN_ENV}",
            file=sys.stderr,
        )
        return token
    return None


def wait(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """`appcircle-proxy wait`; `overrides` are the command line's settings flags."""
    url: str | None = getattr(args, "url", None)
    timeout: float = getattr(args, "timeout", DEFAULT_TIMEOUT)
    if timeout <= 0:
        print("appcircle-proxy wait: --timeout must be more than 0 seconds", file=sys.stderr)
        return 2
    headers: dict[str, str] = {}
    socket_path: str | None = None
    if url is not None:
        given = checked_url(url, "wait")
        if given is None:
            return 2
        base = str(given.origin())
        # No configuration is read; a misspelled settings variable is refused all the same.
        refuse_unknown_setting_variables()
        if client_token := given_client_token(os.environ):
            headers["Proxy-Authorization"] = f"Bearer {client_token}"
    else:
        try:
            # Offline: the addresses are needed, not the keys (a service job may not have them).
            settings = load_settings(getattr(args, "config", None), overrides, probe=True)
        except ConfigError as err:
            print(f"appcircle-proxy: {err}\n(or name the proxy with --url)", file=sys.stderr)
            return 2
        # The admin listener, when there is one, serves readiness without a client token.
        target = probe_target(settings.server.endpoint, settings.server.admin_endpoint)
        endpoint = target.endpoint
        if isinstance(endpoint, UnixSocket):
            socket_path, base = str(endpoint.path), "http://localhost"
        elif endpoint.port == 0:
            print(
                f"appcircle-proxy wait: {target.setting} is port 0 (any free port); "
                "name the proxy with --url",
                file=sys.stderr,
            )
            return 2
        else:
            base = endpoint.url
        try:
            secret = read_client_token(settings.server)
        except (KeyError, ValueError):
            secret = None  # not readable here; the answer will say a token is wanted
        if target.needs_client_token and secret is not None:
            headers["Proxy-Authorization"] = f"Bearer {secret.get_secret_value()}"
    return asyncio.run(_wait(base, headers, socket_path, timeout))


async def _wait(base: str, headers: dict[str, str], socket_path: str | None, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    reason = "no answer yet"
    connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
    async with aiohttp.ClientSession(connector=connector) as session:
        while True:
            left = deadline - time.monotonic()
            try:
                async with session.get(
                    base + READY_PATH,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=max(0.1, min(WAIT_REQUEST_SECONDS, left))),
                ) as reply:
                    if reply.status == 200:
                        print(f"appcircle-proxy: {base} is ready", file=sys.stderr)
                        return 0
                    reason = await _not_ready_reason(reply)
            except (TimeoutError, aiohttp.ClientError) as err:
                reason = f"no answer ({str(err) or type(err).__name__})"
            if time.monotonic() >= deadline:
                print(
                    f"appcircle-proxy wait: {base} is not ready after {timeout:g} s: {reason}",
                    file=sys.stderr,
                )
                return 1
            await asyncio.sleep(min(WAIT_POLL_SECONDS, max(0.0, deadline - time.monotonic())))


async def _not_ready_reason(reply: aiohttp.ClientResponse) -> str:
    if reply.status in (401, 407):
        return (
            f"HTTP {reply.status}: the proxy wants its client token; set {CLIENT_TOKEN_ENV} "
            "(sent as Proxy-Authorization; the proxy takes it in Authorization too), or point "
            "--url at its admin_listen address"
        )
    try:
        answer = await reply.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        return f"HTTP {reply.status}"
    if not isinstance(answer, dict):
        return f"HTTP {reply.status}"
    routes = answer.get("routes")
    detail = str(answer.get("detail", f"HTTP {reply.status}"))
    if isinstance(routes, dict) and routes:
        detail += "; " + "; ".join(f"route '{name}': {why}" for name, why in routes.items())
    return detail
