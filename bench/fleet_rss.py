"""The memory of a shared proxy (issue #19, point 4): the figures behind the resources of
examples/kubernetes-shared.yaml.

    .venv/bin/python bench/fleet_rss.py [--requests 20000] [--connections 64]

It starts the stand-in Appcircle from the tests and appcircle-proxy as a real process
configured as a replica of the shared deployment: TLS on the listener (a trustme
certificate), two named clients with tokens from files, an admin listener, JSON logs. It
reads the proxy's RSS from /proc once it is ready and idle; then `--connections` HTTPS
keep-alive clients, half with each client's token, send `--requests` small GETs between
them while 8 more stream 1 MiB downloads; it prints the peak RSS (VmHWM), the RSS right
after and 10 s later, and the proxy's CPU seconds over the load. Not a test; the figures
vary with the Python build and allocator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the stand-in lives in tests/
from tests.support.standin import StandIn  # noqa: E402

ORG = "11111111-1111-4111-8111-111111111111"
KEY = "bench-key"
TOKENS = {"mobile": "mobile-team-token-0123456789abcdef", "web": "web-team-token-0123456789abcdef"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


async def load(url: str, tls: ssl.SSLContext, requests: int, connections: int) -> int:
    done = 0

    async def client(token: str, count: int) -> None:
        nonlocal done
        connector = aiohttp.TCPConnector(ssl=tls, limit=1)
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
            for _ in range(count):
                async with http.get(f"{url}/build/v2/profiles") as reply:
                    await reply.read()
                    done += reply.status == 200

    async def download(token: str) -> None:
        connector = aiohttp.TCPConnector(ssl=tls)
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
            for _ in range(5):
                async with http.get(f"{url}/_test/download", params={"size": "1048576"}) as reply:
                    async for _chunk in reply.content.iter_chunked(65536):
                        pass

    names = list(TOKENS)
    per_client = requests // connections
    await asyncio.gather(
        *(client(TOKENS[names[i % 2]], per_client) for i in range(connections)),
        *(download(TOKENS[names[i % 2]]) for i in range(8)),
    )
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    loop = asyncio.new_event_loop()
    appcircle = StandIn()
    appcircle.add_personal_key(KEY, ORG)
    loop.run_until_complete(appcircle.start())
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        ca = trustme.CA()
        issued = ca.issue_cert("127.0.0.1")
        issued.private_key_pem.write_to_path(str(work / "tls.key"))
        (work / "tls.crt").write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
        for name, token in TOKENS.items():
            (work / name).write_text(token)
        config = work / "proxy.toml"
        config.write_text(
            f"""
[server]
listen = "127.0.0.1:18787"
admin_listen = "127.0.0.1:19090"
tls_cert_file = "{work / "tls.crt"}"
tls_key_file = "{work / "tls.key"}"
[appcircle]
api_url = "{appcircle.api_url}"
auth_url = "{appcircle.auth_url}"
[log]
format = "json"
[credentials.main]
kind = "personal-access-key"
secret = "{KEY}"
[clients.mobile]
token_file = "{work / "mobile"}"
[clients.web]
token_file = "{work / "web"}"
"""
        )
        command = [sys.executable, "-m", "proxy", "--config", str(config)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while True:
                loop.run_until_complete(asyncio.sleep(0.1))  # the stand-in answers meanwhile
                try:
                    with urllib.request.urlopen("http://127.0.0.1:19090/_proxy/ready") as page:
                        if page.status == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            loop.run_until_complete(asyncio.sleep(2))
            figures = {"idle_rss_mib": status_mib(process.pid, "VmRSS")}
            tls = ssl.create_default_context()
            ca.configure_trust(tls)
            started, cpu_before = time.monotonic(), cpu_seconds(process.pid)
            ok = loop.run_until_complete(
                load("https://127.0.0.1:18787", tls, args.requests, args.connections)
            )
            figures["requests_ok"] = ok
            figures["seconds"] = time.monotonic() - started
            figures["proxy_cpu_seconds"] = cpu_seconds(process.pid) - cpu_before
            figures["peak_rss_mib"] = status_mib(process.pid, "VmHWM")
            figures["after_rss_mib"] = status_mib(process.pid, "VmRSS")
            loop.run_until_complete(asyncio.sleep(10))
            figures["after_10s_rss_mib"] = status_mib(process.pid, "VmRSS")
        finally:
            process.terminate()
            process.wait(30)
            loop.run_until_complete(appcircle.close())
    print(json.dumps({k: round(v, 1) for k, v in figures.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
