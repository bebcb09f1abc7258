"""`appcircle-proxy demo`: the whole mechanism on one machine, with no account and no
network. A small stand-in Appcircle (demo_appcircle) and the proxy in front of it, with one
route per kind of key, and curl commands to try. It reads no file and no environment, so a
real key exported in the shell is never used, nor can it confuse the demo."""

from __future__ import annotations

import asyncio
import secrets
import signal
import uuid
from typing import Any

from ..config.load import load_settings
from ..serve.server import start
from ..telemetry import logs
from .demo_appcircle import DemoAppcircle

__all__ = ["demo"]

ROOT_ORGANIZATION = str(uuid.UUID(int=0x1D1))
SUB_ORGANIZATION = str(uuid.UUID(int=0x5B0))


async def _demo(listen: str, log: dict[str, Any]) -> None:
    personal_key = "demo_pak_" + secrets.token_hex(8)
    api_key_secret = "demo_aks_" + secrets.token_hex(8)
    appcircle = DemoAppcircle(token_lifetime=300)
    appcircle.add_personal_key(personal_key, ROOT_ORGANIZATION, SUB_ORGANIZATION)
    appcircle.add_api_key("demo-bot", api_key_secret, ROOT_ORGANIZATION)
    await appcircle.start()
    try:
        await _serve_demo(appcircle, personal_key, api_key_secret, listen, log)
    finally:
        await appcircle.close()


async def _serve_demo(
    appcircle: DemoAppcircle,
    personal_key: str,
    api_key_secret: str,
    listen: str,
    log: dict[str, Any],
) -> None:
    settings = load_settings(
        None,
        {
            "log": log,
            "server": {"listen": listen},
            "appcircle": {"api_url": appcircle.api_url, "auth_url": appcircle.auth_url},
            "credentials": {
                "me": {"kind": "personal-access-key", "secret": personal_key},
                "legacy": {"kind": "personal-api-token", "secret": personal_key},
                "bot": {"kind": "api-key", "name": "demo-bot", "secret": api_key_secret},
            },
            "routes": {
                "root": {"prefix": "/", "credential": "me"},
                "sub": {
                    "prefix": "/sub",
                    "credential": "legacy",
                    "sub_organization": SUB_ORGANIZATION,
                },
                "bot": {"prefix": "/bot", "credential": "bot"},
            },
        },
        environment=False,
    )
    logs.configure(settings.log)
    running = await start(settings)
    try:
        url = running.urls[0]
        print(
            f"""appcircle-proxy demo: a stand-in Appcircle at {appcircle.api_url} (API) and \
{appcircle.auth_url} (auth),
with made-up keys, and the proxy in front of it at {url}. The stand-in API echoes what it
received: note the Authorization header the proxy added and the organization of the token.

  # a Personal Access Key, for its own organization ({ROOT_ORGANIZATION})
  curl {url}/build/v2/profiles
  # a legacy Personal API Token, for a sub-organization ({SUB_ORGANIZATION})
  curl {url}/sub/distribution/v2/profiles
  # an organization API key
  curl '{url}/bot/build/v1/queue/my-dashboard?page=1&size=10'

  curl {url}/_proxy/ready ; curl {url}/_proxy/metrics

Ctrl-C stops it.""",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await running.stop()


def demo(listen: str, log: dict[str, Any]) -> int:
    """Run the demo until SIGINT/SIGTERM; `log` holds the log settings from the flags."""
    asyncio.run(_demo(listen, log))
    return 0
