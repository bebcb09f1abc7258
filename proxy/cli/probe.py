"""`appcircle-proxy health`: ask a running proxy whether it is live, finding it from the same
configuration (admin_listen when set, else listen), for container health checks."""

from __future__ import annotations

import asyncio
import sys

import aiohttp

from ..config.addresses import Endpoint, UnixSocket, probe_target
from ..config.settings import Settings
from ..paths import HEALTH_PATH

__all__ = ["health", "health_url"]


def health_url(endpoint: Endpoint | UnixSocket) -> str:
    """Where the health endpoint of a proxy reached at `endpoint` answers."""
    if isinstance(endpoint, UnixSocket):
        return f"unix:{endpoint.path}"
    return f"{endpoint.url}{HEALTH_PATH}"


async def _ask(endpoint: Endpoint | UnixSocket, timeout: float) -> int:
    connector: aiohttp.BaseConnector | None = None
    url = health_url(endpoint)
    if isinstance(endpoint, UnixSocket):
        connector = aiohttp.UnixConnector(path=str(endpoint.path))
        url = f"http://localhost{HEALTH_PATH}"
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as http,
        # localhost is a Host name the proxy's guard always accepts, whatever it listens on.
        http.get(url, headers={"Host": "localhost"}) as response,
    ):
        return response.status


def health(settings: Settings, timeout: float) -> int:
    """Exit status 0 when the proxy answers 200 on its health endpoint, else 1 and one line."""
    target = probe_target(settings.server.endpoint, settings.server.admin_endpoint)
    endpoint, setting = target.endpoint, target.setting
    if isinstance(endpoint, Endpoint) and endpoint.port == 0:
        print(
            f"appcircle-proxy health: {setting} is port 0 (chosen at start), so the proxy "
            "cannot be found; give it a fixed port",
            file=sys.stderr,
        )
        return 2
    where = health_url(endpoint)
    try:
        status = asyncio.run(_ask(endpoint, timeout))
    except TimeoutError:
        problem = f"no answer within {timeout:g} s"
    except (aiohttp.ClientError, OSError) as err:
        problem = f"cannot connect ({getattr(err, 'strerror', None) or type(err).__name__})"
    else:
        if status == 200:
            print(f"ok: {where}")
            return 0
        problem = f"answered {status}"
    print(f"appcircle-proxy health: {where} ({setting}): {problem}", file=sys.stderr)
    return 1
