"""One-shot commands that do not serve: `check`, `token` and `config`."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime

from .app import connect
from .settings import Settings
from .tokens import TokenUnavailable

__all__ = ["check", "show_config", "token"]


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
    # Issue 10: the least-privilege rules of each restricted route.
    for route in sorted(upstream.routes, key=lambda route: route.prefix):
        if route.policy.restricted:
            print(f"rule {route.prefix:<12} route '{route.name}': {route.policy.describe()}")
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
    return asyncio.run(_check(settings))


def token(settings: Settings, route_name: str | None) -> int:
    return asyncio.run(_token(settings, route_name))


def show_config(settings: Settings) -> int:
    """Print the effective configuration (file, environment and flags merged), secrets masked."""
    # SecretStr dumps as '**********'; the secret_env / secret_file names are not secret.
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return 0
