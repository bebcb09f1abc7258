"""Packaging: the Dockerfile lints clean and its install steps work (repeated here without a
Docker engine); the example compose file and Kubernetes manifest are valid and configure a
proxy that starts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import __version__
from proxy.config.load import load_settings
from proxy.config.secrets import read_client_token
from tests.standin import StandIn

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(keyword: str) -> list[str]:
    """The Dockerfile's instructions of one kind, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [
        line.split(None, 1)[1]
        for line in joined.splitlines()
        if line.split(None, 1)[:1] == [keyword]
    ]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_unprivileged_with_healthcheck_and_sigterm() -> None:
    assert instructions("USER") == ["10001"]
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = instructions("HEALTHCHECK")
    assert healthcheck.endswith('CMD ["appcircle-proxy", "health"]')
    assert instructions("ENTRYPOINT") == ['["appcircle-proxy"]']


@pytest.fixture(scope="module")
def image_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image's install, done here: the same Python, a fresh venv, the same COPY and RUN."""
    base = instructions("FROM")[-1]
    version = re.fullmatch(r"python:(\d+)\.(\d+)-slim", base)
    assert version, base
    assert sys.version_info[:2] == (int(version[1]), int(version[2])), "not the image's Python"
    work = tmp_path_factory.mktemp("image")
    source = work / "src"
    source.mkdir()
    for copy in (c for c in instructions("COPY") if not c.startswith("--from")):
        *sources, destination = copy.split()
        target = source / destination.removeprefix("./")
        for name in sources:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / name, target)
    venv = work / "venv"
    run = instructions("RUN")[0]  # the build stage's
    commands = [command.strip() for command in run.split("&&")]
    assert commands[0] == "python -m venv /opt/appcircle-proxy"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for command in commands[1:]:
        pip = shlex.split(command)
        assert pip[0] == "/opt/appcircle-proxy/bin/pip"
        subprocess.run(
            [str(venv / "bin" / "pip"), *pip[1:]], cwd=source, check=True, capture_output=True
        )
    yield venv


# Whichever runs first pays for the venv and the install (pip, a wheel build).
@pytest.mark.timeout(180)
def test_the_images_entrypoint_answers_version(image_install: Path) -> None:
    result = subprocess.run(
        [str(image_install / "bin" / "appcircle-proxy"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == f"appcircle-proxy {__version__}"


@pytest.mark.timeout(180)
def test_the_installed_package_carries_its_mit_licence(image_install: Path) -> None:
    """`pip show` (a recent pip: 26.3 checked) prints License-Expression: MIT, and the
    licence text travels with the package, as pyproject.toml's license and license-files
    say."""
    script = (
        "import importlib.metadata as m, json; d = m.distribution('appcircle-proxy'); "
        "print(json.dumps({'expression': d.metadata['License-Expression'], "
        "'files': d.metadata.get_all('License-File'), "
        "'text': [f.read_text() for f in d.files if f.name == 'LICENSE']}))"
    )
    result = subprocess.run(
        [str(image_install / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = json.loads(result.stdout)
    assert installed["expression"] == "MIT"
    assert installed["files"] == ["LICENSE"]
    assert installed["text"] == [(ROOT / "LICENSE").read_text()]
    assert installed["text"][0].startswith("MIT License")


@pytest.mark.timeout(180)
async def test_the_images_healthcheck_passes_against_the_installed_proxy(
    image_install: Path, standin: StandIn, unused_tcp_port: int
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCIRCLE")}
    env |= {
        "APPCIRCLE_PERSONAL_ACCESS_KEY": next(iter(standin.personal_keys)),
        "APPCIRCLE_PROXY_SERVER__LISTEN": f"127.0.0.1:{unused_tcp_port}",
        "APPCIRCLE_PROXY_APPCIRCLE__API_URL": standin.api_url,
        "APPCIRCLE_PROXY_APPCIRCLE__AUTH_URL": standin.auth_url,
        "PATH": f"{image_install / 'bin'}:{env.get('PATH', '')}",
    }
    proxy = await asyncio.create_subprocess_exec(
        "appcircle-proxy",
        "serve",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proxy.stdout is not None
        assert b"listening on" in await asyncio.wait_for(proxy.stdout.readline(), 20)
        (healthcheck,) = instructions("HEALTHCHECK")
        command = json.loads(healthcheck.split("CMD", 1)[1])
        check = await asyncio.create_subprocess_exec(*command, env=env)
        assert await asyncio.wait_for(check.wait(), 20) == 0
    finally:
        proxy.terminate()
        assert await proxy.wait() == 0


def load_environment(pairs: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Load settings from a container's environment, its secret files made up in tmp_path."""
    for name in list(os.environ):
        if name.startswith("APPCIRCLE"):
            monkeypatch.delenv(name)
    for name, value in pairs.items():
        if name.endswith("_FILE"):
            stand_in_file = tmp_path / Path(value).name
            stand_in_file.write_text("made-up-secret")
            value = str(stand_in_file)
        monkeypatch.setenv(name, value)
    return load_settings()


def test_compose_example_is_a_valid_sidecar_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = yaml.safe_load((ROOT / "examples" / "docker-compose.yml").read_text())
    proxy = compose["services"]["appcircle-proxy"]
    job = compose["services"]["job"]
    assert "ports" not in proxy  # never published to the host
    assert job["depends_on"]["appcircle-proxy"]["condition"] == "service_healthy"
    for secret in proxy["secrets"]:
        assert secret in compose["secrets"]
        assert f"/run/secrets/{secret}" in proxy["environment"].values()
    settings = load_environment(proxy["environment"], tmp_path, monkeypatch)
    assert "appcircle-proxy" in settings.server.allowed_hosts
    assert read_client_token(settings.server) is not None
    assert settings.credentials["default"].kind == "personal-access-key"


def test_kubernetes_example_is_a_native_sidecar_with_probes_and_a_secret_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (deployment,) = yaml.safe_load_all((ROOT / "examples" / "kubernetes.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"]["path"].startswith("/_proxy/")
        assert sidecar[probe]["httpGet"]["port"] == "admin"
    assert sidecar["resources"]["requests"]
    env = {item["name"]: item["value"] for item in sidecar["env"]}
    (mount,) = sidecar["volumeMounts"]
    assert env["APPCIRCLE_PERSONAL_ACCESS_KEY_FILE"].startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert (
        volume["secret"]["items"][0]["path"] == Path(env["APPCIRCLE_PERSONAL_ACCESS_KEY_FILE"]).name
    )
    settings = load_environment(env, tmp_path, monkeypatch)
    assert str(settings.server.admin_endpoint) == "0.0.0.0:9090"
    assert settings.server.listen == "127.0.0.1:8787"
    assert [p["containerPort"] for p in sidecar["ports"]] == [9090]
