"""The image, built and run by a real Docker engine: it runs as uid 10001 with no build tools
or source, reads its secrets from mounted files, becomes healthy through `appcircle-proxy
health` (which follows admin_listen), forwards with the session token, writes only JSON
lines, and `docker stop` ends it with exit 0; a mounted config file's listen beats the
image's default; the compose example keeps the key from its job. Where no engine
answers (or no base image can be had), the tests skip and say why, so CI stays green on
machines without Docker."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.standin import StandIn

from .conftest import CLIENT_TOKEN, PERSONAL_KEY, ROOT_ORG

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
    """The built image runs as uid 10001 and holds neither pip, setuptools nor the /src tree, so
    a compromised proxy finds no build tools or source to use."""
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
    """The container reads its key and client token from mounted files, turns healthy via
    admin_listen, enforces the client token (407), forwards with the session token, logs JSON
    only, and exits 0 on docker stop."""
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


# The compose example's job, in the image's Python rather than curl (which the official
# python:3.11-slim lacks): it calls the API through the proxy with its client token, and
# prints all it can see of secrets: its environment, its secret files, and the environment
# of every process it can see.
COMPOSE_JOB = r"""
import json, os, pathlib, urllib.request
token = pathlib.Path("/run/secrets/appcircle_proxy_client_token").read_text().strip()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
request = urllib.request.Request(
    "http://appcircle-proxy:8787/build/v2/profiles",
    headers={"Proxy-Authorization": "Bearer " + token},
)
with opener.open(request) as reply:
    status = reply.status
seen = {"status": status, "environ": dict(os.environ), "files": {}, "processes": {}}
for path in pathlib.Path("/run/secrets").iterdir():
    seen["files"][str(path)] = path.read_text()
for environ in pathlib.Path("/proc").glob("[0-9]*/environ"):
    try:
        seen["processes"][str(environ)] = environ.read_bytes().decode(errors="replace")
    except OSError as err:
        seen["processes"][str(environ)] = err.strerror
print("SEEN " + json.dumps(seen), flush=True)
"""


def _compose() -> list[str] | None:
    if _docker("compose", "version").returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture
async def reachable_standin() -> AsyncIterator[StandIn]:
    """A stand-in Appcircle that containers on a bridge network reach through the host's
    gateway address (host.docker.internal)."""
    appcircle = StandIn()
    appcircle.add_personal_key(PERSONAL_KEY, ROOT_ORG)
    await appcircle.start(host="0.0.0.0")
    yield appcircle
    await appcircle.close()


async def test_the_compose_recipe_keeps_the_key_from_the_job_which_uses_the_proxy(
    image: str, reachable_standin: StandIn, tmp_path: Path
) -> None:
    """examples/docker-compose.yml, run by Docker Compose: the key goes to the proxy's
    container only; the job, with a client token, gets its answer through the proxy and
    finds the key nowhere it can look (its environment, its files, visible processes)."""
    compose = _compose()
    if compose is None:
        pytest.skip("no Docker Compose (docker compose or docker-compose)")
    files = private_secret_files(
        tmp_path / "secrets",
        appcircle_personal_access_key=PERSONAL_KEY,
        appcircle_proxy_client_token=CLIENT_TOKEN,
    )
    standin = reachable_standin
    on_host = "host.docker.internal"
    override = {
        "services": {
            "appcircle-proxy": {
                "image": image,
                "environment": {
                    "APPCIRCLE_PROXY_APPCIRCLE__API_URL": standin.api_url.replace(
                        "0.0.0.0", on_host
                    ),
                    "APPCIRCLE_PROXY_APPCIRCLE__AUTH_URL": standin.auth_url.replace(
                        "0.0.0.0", on_host
                    ),
                },
                "extra_hosts": [f"{on_host}:host-gateway"],
                "healthcheck": {"interval": "1s"},
            },
            "job": {"image": image, "entrypoint": ["python", "-c", COMPOSE_JOB]},
        },
        "secrets": {name: {"file": str(path)} for name, path in files.items()},
    }
    (tmp_path / "override.yml").write_text(json.dumps(override))
    project = [
        *compose,
        "--project-name", f"appcircle-proxy-test-{secrets.token_hex(4)}",
        "-f", str(ROOT / "examples" / "docker-compose.yml"),
        "-f", str(tmp_path / "override.yml"),
    ]  # fmt: skip

    async def run(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *project, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(process.communicate(), 300)
        assert process.returncode is not None
        return process.returncode, out.decode(errors="replace")

    try:
        code, out = await run(
            "up", "--build", "--abort-on-container-exit", "--exit-code-from", "job"
        )
        assert code == 0, out[-3000:]
        _, logs = await run("logs", "--no-color", "job")
        seen = json.loads(logs.split("SEEN ", 1)[1].splitlines()[0])
        _, proxy_logs = await run("logs", "--no-color", "appcircle-proxy")
    finally:
        await run("down", "--volumes", "--rmi", "local")
    assert seen["status"] == 200
    assert standin.api_requests and standin.issued_tokens
    assert PERSONAL_KEY not in json.dumps(seen), "the job found the key"
    assert seen["environ"].get("APPCIRCLE_PERSONAL_ACCESS_KEY_FILE") is None
    assert "listening" in proxy_logs
    for line in proxy_logs.splitlines():
        assert PERSONAL_KEY not in line and CLIENT_TOKEN not in line, line
