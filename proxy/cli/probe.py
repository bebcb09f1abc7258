"""`appcircle-proxy health`: ask a running proxy whether it is live, at --url or found from the
same configuration (admin_listen when set, else listen), for container health checks. It
reads no secret: /_proxy/health answers without the client token."""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from yarl import URL

from ..config.addresses import Endpoint, UnixSocket, probe_target
from ..config.settings import Settings
from ..paths import HEALTH_PATH

__all__ = ["health", "health_at", "health_url"]


def health_url(endpoint: Endpoint | UnixSocket) -> str:
    """Where the health endpoint of a proxy reached at `endpoint` answers."""
    if isinstance(endpoint, UnixSocket):
        return f"unix:{endpoint.path}"
    return f"{endpoint.url}{HEALTH_PATH}"


async def _ask(url: str, socket_path: str | None, timeout: float) -> int:
    connector = aiohttp.UnixConnector(path=socket_path) if socket_path else None
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as http,
        # localhost is a Host name the proxy's guard always accepts, whatever it listens on.
        http.get(url, headers={"Host": "localhost"}, allow_redirects=False) as response,
    ):
        return response.status


def _probe(
    url: str, socket_path: str | None, shown: str, setting: str | None, timeout: float
) -> int:
    try:
        status = asyncio.run(_ask(url, socket_path, timeout))
    except TimeoutError:
        problem = f"no answer within {timeout:g} s"
    except (aiohttp.ClientError, OSError) as err:
        problem = f"cannot connect ({getattr(err, 'strerror', None) or type(err).__name__})"
    else:
        if status == 200:
            print(f"ok: {shown}")
            return 0
        problem = f"answered {status}"
    where = f"{shown} ({setting})" if setting else shown
    print(f"appcircle-proxy health: {where}: {problem}", file=sys.stderr)
    return 1


def checked_url(url: str, command: str) -> URL | None:
    """`--url` of `health` or `wait` as a URL; None, having said why, when it is not http(s)."""
    given = URL(url)
    if given.scheme not in ("http", "https") or not given.host:
        print(
            f"appcircle-proxy {command}: '{url}' is not an http(s) URL; write e.g. "
            "--url http://127.0.0.1:8787",
            file=sys.stderr,
        )
        return None
    return given


def health_at(url: str, timeout: float) -> int:
    """`health --url`: no configuration, no secret; exit 0 when the proxy at `url` is live."""
    given = checked_url(url, "health")
    if given is None:
        return 2
    where = f"{given.origin()}{HEALTH_PATH}"
    return _probe(where, None, where, None, timeout)


def health(settings: Settings, timeout: float) -> int:
    """Exit status 0 when the proxy answers 200 on its health endpoint, else 1 and one line."""
    target = probe_target(settings.server.endpoint, settings.server.admin_endpoint)
    endpoint, setting = target.endpoint, target.setting
    if isinstance(endpoint, Endpoint) and endpoint.port == 0:
        print(
            f"appcircle-proxy health: {setting} is port 0 (chosen at start), so the proxy "
            "cannot be found; give it a fixed port, or name it with --url",
            file=sys.stderr,
        )
        return 2
    shown = health_url(endpoint)
    if isinstance(endpoint, UnixSocket):
        url, socket_path = f"http://localhost{HEALTH_PATH}", str(endpoint.path)
        return _probe(url, socket_path, shown, setting, timeout)
    return _probe(shown, None, shown, setting, timeout)
