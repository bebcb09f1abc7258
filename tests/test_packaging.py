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
import signal
import ssl
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from proxy import __version__
from proxy.config.load import load_settings
from proxy.config.secrets import read_client_token
from proxy.config.settings import ServerSettings
from proxy.serve.server import start
from tests.support.standin import StandIn

from .conftest import (
    CLIENT_TOKEN,
    PERSONAL_KEY,
)
from .support import request

ROOT = Path(__file__).parent.parent


def environment(**variables: str) -> dict[str, str]:
    """This process's environment (no APPCIRCLE_ variables: see above) plus `variables`."""
    return os.environ | variables


DOCKERFILE = (ROOT / "Dockerfile").read_text()


README = (ROOT / "README.md").read_text()


def instructions(keyword: str) -> list[str]:
    """The Dockerfile's instructions of one kind, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [
        line.split(None, 1)[1]
        for line in joined.splitlines()
        if line.split(None, 1)[:1] == [keyword]
    ]


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


def image_environment() -> dict[str, str]:
    """The proxy's variables the Dockerfile's ENV instructions set."""
    pairs = (pair.partition("=") for line in instructions("ENV") for pair in shlex.split(line))
    return {name: value for name, _, value in pairs if name.startswith("APPCIRCLE")}


MANIFESTS = ("kubernetes.yaml", "kubernetes-shared.yaml")


def manifest(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if doc]


def pod_of(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [doc for doc in documents if doc["kind"] == "Deployment"]
    return dict(deployment["spec"]["template"]["spec"])


def test_the_compose_recipe_makes_secrets_the_container_user_can_read_and_git_ignores(
    tmp_path: Path,
) -> None:
    """The shell recipe in examples/docker-compose.yml, run as written, makes a 0700 secrets
    directory with files the container user can read where compose looks, ignored by git and Docker.
    """
    compose_text = (ROOT / "examples" / "docker-compose.yml").read_text()
    recipe = [
        line.removeprefix("#   ").split("  #")[0].strip()
        for line in compose_text.splitlines()
        if line.startswith("#   ") and not line.startswith("#    ")
    ]
    assert recipe[0] == "cd examples" and recipe[-1].startswith("docker compose up")
    (tmp_path / "examples").mkdir()
    script = "\n".join(["set -e", *recipe[:-1]])
    subprocess.run(
        ["sh", "-c", script],
        cwd=tmp_path,
        check=True,
        env=environment(MY_PERSONAL_ACCESS_KEY="pak_example"),
    )
    secrets = tmp_path / "examples" / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700  # no other user of the host gets in
    compose = yaml.safe_load(compose_text)
    for secret in compose["secrets"].values():
        made = tmp_path / "examples" / secret["file"]
        assert made.is_file(), secret  # where compose looks, relative to the compose file
        assert made.stat().st_mode & 0o004  # readable by uid 10001 through the bind mount
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(Path("examples") / secret["file"])], cwd=ROOT
        )
        assert ignored.returncode == 0, f"{secret['file']} is not in .gitignore"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "**/secrets" in dockerignore and "secrets" in dockerignore


def test_compose_gives_the_drain_time_to_finish_and_does_not_claim_the_host_cannot_connect() -> (
    None
):
    """The compose example's stop_grace_period is longer than server.shutdown_timeout, so Docker
    does not kill the proxy mid-drain."""
    text = (ROOT / "examples" / "docker-compose.yml").read_text()
    proxy = yaml.safe_load(text)["services"]["appcircle-proxy"]
    grace = int(proxy["stop_grace_period"].removesuffix("s"))
    assert grace > ServerSettings().shutdown_timeout
    assert "not from the host" not in text


def test_kubernetes_probes_never_restart_the_sidecar_for_an_appcircle_outage() -> None:
    """The Kubernetes example probes liveness and startup on /_proxy/health and readiness on
    /_proxy/ready, so an Appcircle outage never restarts the sidecar, and its grace period covers
    the drain."""
    (deployment,) = yaml.safe_load_all((ROOT / "examples" / "kubernetes.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/_proxy/health"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/_proxy/health"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/_proxy/ready"
    assert pod["terminationGracePeriodSeconds"] > ServerSettings().shutdown_timeout


def test_dockerfile_passes_hadolint() -> None:
    """The Dockerfile passes hadolint with no finding."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_unprivileged_with_healthcheck_and_sigterm() -> None:
    """The Dockerfile runs as USER 10001, stops with SIGTERM, checks health with `appcircle-proxy
    health`, and has appcircle-proxy as its entrypoint."""
    assert instructions("USER") == ["10001"]
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = instructions("HEALTHCHECK")
    assert healthcheck.endswith('CMD ["appcircle-proxy", "health"]')
    assert instructions("ENTRYPOINT") == ['["appcircle-proxy"]']


# Whichever runs first pays for the venv and the install (pip, a wheel build).
@pytest.mark.timeout(180)
def test_the_images_entrypoint_answers_version(image_install: Path) -> None:
    """The Dockerfile's install steps, repeated in a fresh venv, give an appcircle-proxy
    entrypoint that prints the package version."""
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
    """The Dockerfile's HEALTHCHECK command, run against the proxy installed as the image
    installs it, exits 0, and the proxy exits 0 on SIGTERM."""
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


def test_a_mounted_config_files_listen_beats_the_images_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flags > environment > file > built-in defaults, and the image's default listen is a
    built-in default: it must not be an APPCIRCLE_PROXY_SERVER__LISTEN, which beats the file."""
    config = tmp_path / "config.toml"
    config.write_text(
        '[server]\nlisten = "0.0.0.0:9999"\n[credentials.main]\nkind = "personal-access-key"\n'
        'secret = "made-up"\n'
    )
    image = image_environment()
    settings = load_environment(
        {**image, "APPCIRCLE_PROXY_CONFIG": str(config)}, tmp_path, monkeypatch
    )
    assert settings.server.listen == "0.0.0.0:9999"
    # Without a file, the image listens beyond loopback, so its neighbours reach it.
    settings = load_environment(
        {**image, "APPCIRCLE_PERSONAL_ACCESS_KEY": "made-up"}, tmp_path, monkeypatch
    )
    assert settings.server.listen == "0.0.0.0:8787"


def test_compose_example_is_a_valid_sidecar_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compose example publishes no port, starts the job once the proxy is healthy, mounts
    each secret it names, and its environment loads as a config with a client token and the
    service name allowed."""
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
    """The Kubernetes example is a native sidecar (restartPolicy Always) probed on the admin
    port, reads its key from the mounted secret's file, and loads with admin on 0.0.0.0:9090 and
    the API listener on loopback."""
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


@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_manifest_passes_kubernetes_validate_strict(name: str) -> None:
    """Every resource matches the Kubernetes API schema, with no field it does not know."""
    validate = shutil.which("kubernetes-validate") or str(
        Path(sys.executable).parent / "kubernetes-validate"
    )
    result = subprocess.run(
        [validate, "--strict", "--quiet", str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_pod_passes_pod_security_restricted(name: str) -> None:
    """The checks of Pod Security "restricted" that a manifest decides: a namespace that
    enforces it admits the pod (every container, the app's included)."""
    pod = pod_of(manifest(name))
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert all("hostPath" not in volume for volume in pod.get("volumes", []))
    pod_context = pod.get("securityContext", {})
    containers = pod.get("initContainers", []) + pod["containers"]
    for container in containers:
        context = container.get("securityContext")
        assert context is not None, container["name"]
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", container["name"]
        assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True
        # runAsNonRoot is only checkable for a numeric user (curl's image names its user).
        assert context.get("runAsUser", pod_context.get("runAsUser", 1)) != 0
        assert isinstance(context.get("runAsUser", pod_context.get("runAsUser")), int)
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert not context["capabilities"].get("add") and not context.get("privileged")


@pytest.mark.parametrize("name", MANIFESTS)
def test_kubernetes_manifest_uses_the_image_the_readme_builds_and_secret_files(
    name: str,
) -> None:
    """The image is the tag `docker build` in the README makes (a bare name is :latest),
    pulled only if absent; the setup in the header puts secrets in with --from-file, never
    on a command line."""
    (built,) = re.findall(r"^docker build -t (\S+) \.$", README, re.MULTILINE)
    tag = built if ":" in built else f"{built}:latest"
    pod = pod_of(manifest(name))
    (proxy,) = [
        c
        for c in pod.get("initContainers", []) + pod["containers"]
        if c["name"] == "appcircle-proxy"
    ]
    assert proxy["image"] == tag
    assert proxy["imagePullPolicy"] == "IfNotPresent"
    text = (ROOT / "examples" / name).read_text()
    assert "--from-literal" not in text
    assert "kubectl create secret generic appcircle-key --from-file" in re.sub(
        r"-n appcircle-proxy |\\\n#\s+", "", text
    )


async def test_shared_deployment_serves_named_clients_over_tls_behind_its_service(
    standin: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    """examples/kubernetes-shared.yaml: 2-3 replicas behind a Service, admitted only from the
    runners' namespace, one down at most, ready on /_proxy/ready; its configuration, with
    the mounted secrets made up here, starts a proxy that serves each team over TLS."""
    documents = {doc["kind"]: doc for doc in manifest("kubernetes-shared.yaml")}
    deployment, pod = documents["Deployment"], pod_of(list(documents.values()))
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert 2 <= deployment["spec"]["replicas"] <= 3
    assert documents["Service"]["spec"]["selector"] == labels
    assert documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    assert documents["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    policy = documents["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == labels
    api_rule = [rule for rule in policy["ingress"] if rule["ports"][0]["port"] == 8787]
    assert api_rule[0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci-runners"}}}
    ]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/_proxy/ready", "port": "admin"}
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}

    # The configuration as the pod reads it, its secret files made up under tmp_path.
    config_text = documents["ConfigMap"]["data"]["config.toml"]
    paths = re.findall(r'"(/var/run/secrets/[^"]+)"', config_text)
    assert {str(Path(path).parent) for path in paths} <= mounts
    ca = trustme.CA()
    issued = ca.issue_cert("appcircle-proxy.appcircle-proxy.svc", "127.0.0.1")
    tokens = {"mobile": CLIENT_TOKEN, "qa": "qa_" + "7e" * 16}
    secrets = tmp_path / "secrets"
    for path in paths:
        made_up = secrets / Path(path).relative_to("/var/run/secrets")
        made_up.parent.mkdir(parents=True, exist_ok=True)
        if made_up.name == "tls.crt":
            made_up.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        elif made_up.name == "tls.key":
            issued.private_key_pem.write_to_path(str(made_up))
        else:
            made_up.write_text(tokens.get(made_up.name, PERSONAL_KEY))
    config = tmp_path / "config.toml"
    config.write_text(config_text.replace("/var/run/secrets/", f"{secrets}/"))
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__LISTEN", "127.0.0.1:0")
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__ADMIN_LISTEN", "127.0.0.1:0")
    monkeypatch.setenv("APPCIRCLE_PROXY_APPCIRCLE__API_URL", standin.api_url)
    monkeypatch.setenv("APPCIRCLE_PROXY_APPCIRCLE__AUTH_URL", standin.auth_url)
    settings = load_settings(config)
    assert settings.server.tls_cert_file is not None and set(settings.clients) == set(tokens)
    assert "appcircle-proxy.appcircle-proxy.svc" in settings.server.allowed_hosts
    running = await start(settings)
    try:
        trusted = ssl.create_default_context()
        ca.configure_trust(trusted)
        proxy = running.urls[0]
        assert proxy.startswith("https://")

        async def status(path: str, team: str) -> int:
            headers = {"Authorization": f"Bearer {tokens[team]}"}
            reply = await request(http, "GET", proxy + path, headers=headers, ssl=trusted)
            return reply.status

        assert await status("/build/v2/profiles", "mobile") == 200
        assert await status("/qa/distribution/v2/profiles", "qa") == 200
        assert await status("/build/v2/profiles", "qa") == 403  # not qa's route
        assert await status("/qa/build/v2/profiles", "qa") == 403  # not in the route's rules
    finally:
        await running.stop()


async def test_the_wheel_has_no_test_stand_in_and_its_demo_works_without_the_source(
    image_install: Path, tmp_path: Path, unused_tcp_port: int
) -> None:
    """The wheel carries the product only: the fault-switching stand-in and its /_test routes
    stay in tests/, and `demo`, installed from the wheel in a fresh venv away from the source
    tree, serves its three curl commands with its own small stand-in."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        check=True,
    )
    assert built.returncode == 0
    (wheel,) = tmp_path.glob("appcircle_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        contents = b"".join(archive.read(name) for name in names if name.endswith(".py"))
    assert not [name for name in names if "standin" in name or name.startswith("tests/")]
    assert b"/_test" not in contents
    assert "proxy/cli/demo_appcircle.py" in names and "proxy/serve/server.py" in names
    process = await asyncio.create_subprocess_exec(
        str(image_install / "bin" / "appcircle-proxy"),
        "demo",
        "--listen",
        f"127.0.0.1:{unused_tcp_port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,  # not the source tree: the installed package alone
    )
    assert process.stdout is not None
    try:
        text = ""
        while "Ctrl-C" not in text:
            text += (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        urls = re.findall(r"^  curl '?(http://\S+?)'?$", text, re.MULTILINE)
        assert len(urls) == 3, text
        async with aiohttp.ClientSession() as http:
            for url in urls:
                async with http.get(url) as reply:
                    assert reply.status == 200
                    assert (await reply.json())["headers"]
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 20) == 0
