"""One-shot commands that do not serve: `check` (and `check --offline`), `token` and `config`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from ..auth.local_tokens import EXCHANGE_ENDPOINTS
from ..auth.tokens import TokenUnavailable
from ..config.settings import Settings
from ..serve.app import connect

__all__ = ["check", "check_offline", "show_config", "token"]


class _OnlyErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextmanager
def _one_attempt() -> Iterator[None]:
    """The one-shot commands make one exchange per route and report its outcome themselves;
    the renewal loop's own lines would repeat it and promise retries that never come."""
    tokens_log = logging.getLogger("appcircle_proxy.tokens")
    quiet = _OnlyErrors()
    tokens_log.addFilter(quiet)
    try:
        yield
    finally:
        tokens_log.removeFilter(quiet)


def _print_exchanges(prefixes: list[str]) -> None:
    """The key exchanges the proxy answers itself (with local tokens), under each prefix."""
    print("key exchanges answered here (local tokens; none reaches the auth host):")
    for prefix in sorted(prefixes):
        base = "" if prefix == "/" else prefix
        print(f"  POST {', '.join(base + endpoint for endpoint in EXCHANGE_ENDPOINTS)}")


async def _check(settings: Settings) -> int:
    failed = 0
    async with connect(settings) as upstream:
        for route in sorted(upstream.routes, key=lambda route: route.prefix):
            credential = route.credential
            head = f"{route.prefix:<12} route '{route.name}', {credential.kind} '{credential.name}'"
            try:
                token = await route.tokens.get()
            except TokenUnavailable as problem:
                failed += 1
                print(f"FAIL {head}: {problem.failure.detail}", flush=True)
                continue
            expires = datetime.fromtimestamp(token.expires_at, UTC).isoformat(timespec="seconds")
            print(
                f"ok   {head}: organization {token.organization_id or 'unknown'}, "
                f"token expires {expires}",
                flush=True,
            )
    # The least-privilege rules of each restricted route.
    for route in sorted(upstream.routes, key=lambda route: route.prefix):
        if route.policy.restricted:
            print(f"rule {route.prefix:<12} route '{route.name}': {route.policy.describe()}")
    _print_exchanges(upstream.routes.prefixes)
    if failed:
        print(f"{failed} route(s) cannot get a session token; see above", file=sys.stderr)
        return 1
    return 0


async def _token(settings: Settings, route_name: str | None) -> int:
    async with connect(settings) as upstream:
        routes = list(upstream.routes)
        if route_name is None:
            if len(routes) > 1:
                names = ", ".join(sorted(route.name for route in routes))
                print(
                    f"several routes are configured; choose one with --route ({names})",
                    file=sys.stderr,
                )
                return 2
            route = routes[0]
        else:
            found = upstream.routes.by_name(route_name)
            if found is None:
                names = ", ".join(sorted(route.name for route in routes))
                print(f"no route named '{route_name}'; configured routes: {names}", file=sys.stderr)
                return 2
            route = found
        try:
            token = await route.tokens.get()
        except TokenUnavailable as problem:
            print(f"route '{route.name}': {problem.failure.detail}", file=sys.stderr)
            return 1
        print(token.value, flush=True)
        return 0


def check(settings: Settings) -> int:
    with _one_attempt():
        return asyncio.run(_check(settings))


def token(settings: Settings, route_name: str | None) -> int:
    with _one_attempt():
        return asyncio.run(_token(settings, route_name))


def check_offline(settings: Settings) -> int:
    """The configuration is valid (it was loaded offline): print its routes and what only
    the deployment can check (secrets, files), so a laptop can vet a deployment's config."""
    print("configuration is valid (offline: no secret read, no network)")
    for name, route in sorted(settings.routes.items(), key=lambda item: item[1].prefix):
        credential = settings.credentials[route.credential]
        organization = route.sub_organization or "the key's own organization"
        upstream = "" if route.upstream == "api" else f", upstream {route.upstream}"
        print(
            f"  {route.prefix:<12} route '{name}', {credential.kind} '{route.credential}', "
            f"{organization}{upstream}"
        )
        if route.mcp_tools is not None:
            print(f"  {'':<12} MCP tools: {', '.join(route.mcp_tools)}")
        if route.policy.restricted:
            print(f"  {'':<12} {route.policy.describe()}")
    _print_exchanges([route.prefix for route in settings.routes.values()])
    server, appcircle = settings.server, settings.appcircle
    print(
        f"  listens on {server.listen}"
        + (f", admin on {server.admin_listen}" if server.admin_listen else "")
    )
    needed = [
        *(
            f"credentials.{name}: variable {credential.secret_env}"
            for name, credential in settings.credentials.items()
            if credential.secret_env is not None
        ),
        *(
            f"credentials.{name}: file {credential.secret_file}"
            for name, credential in settings.credentials.items()
            if credential.secret_file is not None
        ),
        *(
            [f"server.client_token_env: variable {server.client_token_env}"]
            if server.client_token_env
            else []
        ),
        *(
            [f"server.client_token_file: file {server.client_token_file}"]
            if server.client_token_file
            else []
        ),
        *([f"appcircle.ca_file: file {appcircle.ca_file}"] if appcircle.ca_file else []),
    ]
    if needed:
        print("not checked offline; the deployment must provide:")
        for item in needed:
            print(f"  {item}")
    return 0


def show_config(settings: Settings) -> int:
    """Print the effective configuration (file, environment and flags merged), secrets masked."""
    # SecretStr dumps as '**********'; the secret_env / secret_file names are not secret.
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0
