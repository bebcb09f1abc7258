"""The image, built and run by a real Docker engine: it runs as uid 10001 with no build tools
or source, reads its secrets from mounted files, becomes healthy through `appcircle-proxy
health` (which follows admin_listen), forwards with the session token, writes only JSON
lines, and `docker stop` ends it with exit 0. Where no engine answers (or no base image can
be had), the tests skip and say why, so CI stays green on machines without Docker."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.standin import StandIn

from .conftest import CLIENT_TOKEN, PERSONAL_KEY

# The first build may pull the base image and every dependency.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).parent.parent
BASE_IMAGE = "python:3.11-slim"
MAKE_AN_ENGINE = "../shared/tools/docker-standin-base makes one"


def _docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def _why_no_engine() -> str | None:
    if shutil.which("docker") is None:
        return f"no docker command ({MAKE_AN_ENGINE})"
    info = _docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    if info.returncode != 0:
        problem = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"no Docker engine answers ({problem}); {MAKE_AN_ENGINE}"
    if _docker("image", "inspect", BASE_IMAGE).returncode != 0:
        pull = _docker("pull", BASE_IMAGE, timeout=300)
        if pull.returncode != 0:
            problem = (pull.stderr.strip().splitlines() or ["failed"])[-1]
            return f"the base image {BASE_IMAGE} is not here and cannot be pulled ({problem})"
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    problem = _why_no_engine()
    if problem is not None:
        pytest.skip(f"the image is not tested: {problem}")
    tag = f"appcircle-proxy:test-{secrets.token_hex(4)}"
    build = _docker("build", "-q", "-t", tag, str(ROOT), timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    yield tag
    _docker("rmi", "-f", tag)


async def docker(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """docker ARGS, without blocking the event loop the stand-in Appcircle runs on."""
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_the_image_runs_as_uid_10001_without_build_tools_or_source(image: str) -> None:
    probe = (
        "import os, importlib.util as u; "
        "print(os.getuid(), u.find_spec('pip'), u.find_spec('setuptools'), os.path.exists('/src'))"
    )
    result = _docker("run", "--rm", "--entrypoint", "python", image, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10001", "None", "None", "False"]


def private_secret_files(directory: Path, **contents: str) -> dict[str, Path]:
    """Secret files as the compose example makes them: readable by all, in a directory only
    their owner can open, so the container's user can read them through a bind mount."""
    directory.mkdir(mode=0o700)
    files = {}
    for name, content in contents.items():
        path = directory / name
        path.write_text(content)
        path.chmod(0o644)
        files[name] = path
    return files


async def test_the_container_becomes_healthy_forwards_with_the_token_and_stops_cleanly(
    image: str,
    standin: StandIn,
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    port, admin_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    files = private_secret_files(
        tmp_path / "secrets", personal_access_key=PERSONAL_KEY, client_token=CLIENT_TOKEN
    )
    name = f"appcircle-proxy-test-{secrets.token_hex(4)}"
    environment = {
        "APPCIRCLE_PERSONAL_ACCESS_KEY_FILE": "/run/secrets/personal_access_key",
        "APPCIRCLE_PROXY_SERVER__CLIENT_TOKEN_FILE": "/run/secrets/client_token",
        # The stand-in listens on the host's loopback, which the host network shares.
        "APPCIRCLE_PROXY_SERVER__LISTEN": f"127.0.0.1:{port}",
        # Not the image's default port: the health check must find it from the config.
        "APPCIRCLE_PROXY_SERVER__ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "APPCIRCLE_PROXY_APPCIRCLE__API_URL": standin.api_url,
        "APPCIRCLE_PROXY_APPCIRCLE__AUTH_URL": standin.auth_url,
        "APPCIRCLE_PROXY_LOG__FORMAT": "json",
    }
    run = ["run", "-d", "--name", name, "--network", "host", "--health-interval", "1s"]
    for secret, path in files.items():
        run += ["-v", f"{path}:/run/secrets/{secret}:ro"]
    for variable, value in environment.items():
        run += ["-e", f"{variable}={value}"]
    code, _, err = await docker(*run, image)
    assert code == 0, err
    try:
        deadline = time.monotonic() + 30
        health = ""
        while health != "healthy":
            code, out, _ = await docker(
                "inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", name
            )
            state, _, health = out.strip().partition(" ")
            if state != "running" or health == "unhealthy" or time.monotonic() > deadline:
                _, logs, errors = await docker("logs", name)
                pytest.fail(f"container {state}, health {health}:\n{logs}{errors}")
            await asyncio.sleep(0.2)

        code, out, _ = await docker("exec", name, "id", "-u")
        assert out.strip() == "10001"
        url = f"http://127.0.0.1:{port}/build/v2/profiles"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                assert response.status == 407
            authorised = {"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}"}
            async with http.get(url, headers=authorised) as response:
                assert response.status == 200
        seen = dict(standin.api_requests[-1].headers)
        assert seen["Authorization"] == f"Bearer {standin.issued_tokens[-1]}"

        started = time.monotonic()
        code, _, err = await docker("stop", name, timeout=30)
        assert code == 0, err
        assert time.monotonic() - started < 10  # drained and exited, not killed at the grace
        code, out, _ = await docker("inspect", "--format", "{{.State.ExitCode}}", name)
        assert out.strip() == "0"
        code, out, err = await docker("logs", name)
        lines = [json.loads(line) for line in (out + err).splitlines()]
        events = [line["event"] for line in lines if "event" in line]
        assert events == ["listening", "stopped"]
        assert PERSONAL_KEY not in out + err and CLIENT_TOKEN not in out + err
    finally:
        await docker("rm", "-f", name)


async def test_a_mounted_config_files_listen_beats_the_images_default(
    image: str,
    standin: StandIn,
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    """Flags > environment > file > built-in defaults, in the image too: its default listen
    (0.0.0.0:8787) must not silently beat the listen of the file it is given."""
    port = unused_tcp_port_factory()
    files = private_secret_files(
        tmp_path / "secrets",
        personal_access_key=PERSONAL_KEY,
        config=(
            f'[server]\nlisten = "127.0.0.1:{port}"\n'
            f'[appcircle]\napi_url = "{standin.api_url}"\nauth_url = "{standin.auth_url}"\n'
            '[log]\nformat = "json"\n'
            '[credentials.main]\nkind = "personal-access-key"\n'
            'secret_file = "/run/secrets/personal_access_key"\n'
        ),
    )
    name = f"appcircle-proxy-test-{secrets.token_hex(4)}"
    run = ["run", "-d", "--name", name, "--network", "host", "--health-interval", "1s"]
    for secret, path in files.items():
        run += ["-v", f"{path}:/run/secrets/{secret}:ro"]
    run += ["-e", "APPCIRCLE_PROXY_CONFIG=/run/secrets/config"]
    code, _, err = await docker(*run, image)
    assert code == 0, err
    try:
        deadline = time.monotonic() + 30
        health = ""
        while health != "healthy":  # the health check finds the file's address too
            code, out, _ = await docker(
                "inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", name
            )
            state, _, health = out.strip().partition(" ")
            if state != "running" or health == "unhealthy" or time.monotonic() > deadline:
                _, logs, errors = await docker("logs", name)
                pytest.fail(f"container {state}, health {health}:\n{logs}{errors}")
            await asyncio.sleep(0.2)
        _, out, err = await docker("logs", name)
        listening = next(
            json.loads(line) for line in (out + err).splitlines() if '"listening"' in line
        )
        assert listening["address"] == f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/build/v2/profiles") as response:
                assert response.status == 200
    finally:
        await docker("rm", "-f", name)
