"""The serving process under signals: SIGTERM drains in-flight requests and exits 0; SIGHUP
reloads credentials without downtime; JSON logs are one object per line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest
import trustme
from yarl import URL

from tests.standin import StandIn

from .conftest import INLINE_KEY_CONFIG, PERSONAL_KEY, ROOT_ORG, WriteConfig
from .processes import serving
from .support import eventually, request
from .test_guard import listener_certificate


async def stderr_of(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    return (await process.stderr.read()).decode()


async def test_sigterm_lets_in_flight_requests_finish_then_exits_0(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """On SIGTERM an in-flight request still gets its 200, then the process exits 0 with no
    traceback and accepts no new connections."""
    config = write_config(credentials=INLINE_KEY_CONFIG, server={"shutdown_timeout": 10})
    async with serving(config) as (proxy, process), aiohttp.ClientSession() as http:
        slow = asyncio.create_task(
            request(http, "GET", f"{proxy}/_test/slow", params={"seconds": "1"})
        )
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        reply = await slow
        assert reply.status == 200
        assert reply.json() == {"slow": True}
        assert await asyncio.wait_for(process.wait(), 20) == 0
        with pytest.raises(aiohttp.ClientConnectionError):
            await request(http, "GET", f"{proxy}/x")  # nobody serves after shutdown
        assert "Traceback" not in await stderr_of(process)


async def test_sighup_reloads_a_rotated_key_without_downtime(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """SIGHUP keeps the token when the key file is unchanged, renews at once when it changed, and
    keeps the running config when the file is broken, serving throughout and never logging a key."""
    secret_file = tmp_path / "key"
    secret_file.write_text(PERSONAL_KEY)
    config = write_config(
        credentials={"main": {"kind": "personal-access-key", "secret_file": str(secret_file)}}
    )
    async with serving(config) as (proxy, process), aiohttp.ClientSession() as http:
        assert (await request(http, "GET", f"{proxy}/x")).status == 200
        process.send_signal(signal.SIGHUP)  # nothing changed: the token stays
        await asyncio.sleep(0.3)
        assert (await request(http, "GET", f"{proxy}/x")).status == 200
        assert len(standin.exchanges) == 1

        rotated = PERSONAL_KEY + "-rotated"
        standin.add_personal_key(rotated, ROOT_ORG)
        secret_file.write_text(rotated)
        process.send_signal(signal.SIGHUP)
        await eventually(lambda: len(standin.exchanges) == 2, within=5)  # renewed by SIGHUP
        del standin.personal_keys[PERSONAL_KEY]
        assert (await request(http, "GET", f"{proxy}/x")).status == 200

        config.write_text("this is [not valid toml")
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        # A broken reload keeps the running config.
        assert (await request(http, "GET", f"{proxy}/x")).status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        logs = await stderr_of(process)
    assert "reload: credential 'main' unchanged" in logs
    assert "reload: credential 'main' changed; renewing its token" in logs
    assert "reload failed, keeping the running configuration" in logs
    assert rotated not in logs and PERSONAL_KEY not in logs


async def test_sighup_reloads_a_key_given_in_the_environment_after_it_left_the_environment(
    standin: StandIn,
) -> None:
    """The proxy takes the key variables out of its environment once read; a reload reads
    them again all the same (zero-config, and --workers whose worker restarts re-read)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TEST_")},
        "APPCIRCLE_PERSONAL_ACCESS_KEY": PERSONAL_KEY,
    }
    for workers in ("1", "2"):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--workers", workers,
            "--listen", f"127.0.0.1:{free_port()}",
            "--api-url", standin.api_url, "--auth-url", standin.auth_url,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        banner = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        proxy = banner.split("listening on ")[1].split()[0]
        async with aiohttp.ClientSession() as http:
            assert (await request(http, "GET", f"{proxy}/x")).status == 200
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            assert (await request(http, "GET", f"{proxy}/x")).status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        logs = await stderr_of(process)
        assert "reload: credential 'default' unchanged" in logs, logs
        assert "reload failed" not in logs and "Traceback" not in logs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_json_logs_are_one_object_per_line(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """With log.format json a request writes one access entry with path, status, route and timing
    fields, and the token exchange one entry with routes and outcome."""
    config = write_config(credentials=INLINE_KEY_CONFIG, log={"format": "json"})
    async with serving(config) as (proxy, process), aiohttp.ClientSession() as http:
        assert (await request(http, "GET", f"{proxy}/build/v2/profiles?page=2")).status == 200
        process.send_signal(signal.SIGTERM)
        await process.wait()
        lines = (await stderr_of(process)).splitlines()
    # Every line, not only those that look like JSON: a stray text line fails here.
    entries = [json.loads(line) for line in lines if line.strip()]
    access = [e for e in entries if e["logger"] == "appcircle_proxy.access"]
    assert len(access) == 1
    assert access[0]["path"] == "/build/v2/profiles"
    assert access[0]["status"] == 200 and access[0]["route"] == "default"
    assert {"time", "level", "message", "duration_ms", "bytes_in", "bytes_out"} <= set(access[0])
    exchanges = [e for e in entries if "obtained session token" in e["message"]]
    assert [(e["routes"], e["outcome"]) for e in exchanges] == [("default", "ok")]


async def test_sighup_gives_new_connections_the_new_listener_certificate(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """Certificate rotation without a restart: after the files are replaced and SIGHUP, a
    new connection is served with the new certificate; one opened before keeps working."""
    ca = trustme.CA()
    config = write_config(
        credentials=INLINE_KEY_CONFIG, server=listener_certificate(ca, tmp_path, "first")
    )
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)

    async def served_as(url: str) -> str:
        reader, writer = await asyncio.open_connection(
            URL(url).host, URL(url).port, ssl=trusted, server_hostname="127.0.0.1"
        )
        certificate = writer.get_extra_info("peercert")
        writer.close()
        await writer.wait_closed()
        (common_name,) = [v for rdn in certificate["subject"] for k, v in rdn if k == "commonName"]
        return str(common_name)

    async with serving(config) as (proxy, process):
        connector = aiohttp.TCPConnector(ssl=trusted)
        async with aiohttp.ClientSession(connector=connector) as https:
            assert (await request(https, "GET", f"{proxy}/x")).status == 200  # kept alive
            assert await served_as(proxy) == "first"
            listener_certificate(ca, tmp_path, "second")
            process.send_signal(signal.SIGHUP)

            async def renewed() -> bool:
                return await served_as(proxy) == "second"

            await eventually(renewed, within=5)
            assert (await request(https, "GET", f"{proxy}/x")).status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        logs = await stderr_of(process)
    assert "reloaded the listener's TLS certificate" in logs
    assert "PRIVATE KEY" not in logs
