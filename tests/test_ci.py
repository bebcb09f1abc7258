"""CI lifecycles as a job runs them: `run -- CMD`, `wait`, and every CI recipe in the
README run as written against the stand-in."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.cli.ci import child_environment
from proxy.config.load import load_settings
from proxy.serve.server import start
from tests.support.standin import StandIn

from .conftest import (
    CLIENT_TOKEN,
    PERSONAL_KEY,
    ROOT_ORG,
    SUB_ORG,
    StartProxy,
    WriteConfig,
)
from .support import eventually, free_port, proxy_config

TWO_ROUTES = {
    "root": {"prefix": "/", "credential": "main"},
    "eu": {"prefix": "/eu", "credential": "main", "sub_organization": SUB_ORG},
}


# The child a CI step would run: calls the API through the proxy it was given, writes its
# whole environment to a file for the test to search, and exits with status 7.
CHILD = r"""
import json, os, sys, urllib.request
url = os.environ["APPCIRCLE_PROXY_URL"]
headers = {}
if "APPCIRCLE_PROXY_CLIENT_TOKEN" in os.environ:
    headers["Authorization"] = "Bearer " + os.environ["APPCIRCLE_PROXY_CLIENT_TOKEN"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(urllib.request.Request(url + "/build/v2/profiles", headers=headers)) as reply:
    seen = json.load(reply)
with open(sys.argv[1], "w") as out:
    json.dump({"environ": dict(os.environ), "organization": seen["organization"]}, out)
sys.exit(7)
"""


async def appcircle_proxy(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else os.environ.copy(),
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def no_key_nor_config() -> dict[str, str]:
    """A second shell's environment: no key (it was on the proxy's command line), no file."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("APPCIRCLE_", "TEST_"))
    }


ROOT = Path(__file__).parent.parent


RECIPE = re.compile(
    r"<!-- recipe: (?P<name>[\w-]+) -->\n```(?P<language>\w+)\n(?P<body>.*?)\n```", re.DOTALL
)


EXPRESSION = re.compile(r"\$\{\{\s*(?:secrets|vars)\.(\w+)\s*\}\}")


# What a bare image or runner has besides Python: a shell, curl and core tools; not git.
TOOLS = ("sh", "bash", "curl", "env", "cat", "mkdir", "rm", "sleep", "test", "uname", "ls")


PROFILE_ID = "3fa85f64-5717-4562-b3fc-2c963f66afa6"


TESTED = {"build-wheel", "github-run", "gitlab-run", "github-service", "gitlab-service"}


def recipes() -> dict[str, str]:
    """The README's recipes by name: the text of each fenced block after its marker."""
    found = {m["name"]: m["body"] for m in RECIPE.finditer((ROOT / "README.md").read_text())}
    assert found, "no <!-- recipe: NAME --> blocks in README.md"
    return found


@dataclass(frozen=True)
class Runner:
    """A bare runner: its PATH (the fresh venv first) and the wheel built once."""

    path: str
    wheel: Path


@pytest.fixture(scope="module")
def bare_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """The wheel built by the README's build-wheel recipe, in a copy of the sources (as a
    checkout would be), and a fresh venv to install it into."""
    work = tmp_path_factory.mktemp("runner")
    tools = work / "tools"
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
    path = f"{work / 'venv' / 'bin'}:{tools}"
    checkout = work / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout)
    shutil.copytree(
        ROOT / "proxy", checkout / "proxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    result = subprocess.run(
        ["bash", "-e", "-c", recipes()["build-wheel"]],
        cwd=checkout,
        env=bare_environment(path, work),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (checkout / "dist").glob("appcircle_proxy-*.whl")
    yield Runner(path, wheel)


def bare_environment(path: str, home: Path) -> dict[str, str]:
    """A runner's environment: PATH, HOME and the machine's pip settings (the package
    index here), nothing else of ours."""
    pip = {name: value for name, value in os.environ.items() if name.startswith("PIP_")}
    return {"PATH": path, "HOME": os.environ.get("HOME", str(home)), "LANG": "C.UTF-8", **pip}


def ci_variables(runner: Runner) -> dict[str, str]:
    """The secrets and variables a user defines in the CI's settings."""
    return {
        "APPCIRCLE_PERSONAL_ACCESS_KEY": PERSONAL_KEY,
        "APPCIRCLE_PROXY_WHEEL": str(runner.wheel),
        "APPCIRCLE_PROFILE_ID": PROFILE_ID,
    }


def expand(text: str, variables: dict[str, str]) -> str:
    """What GitHub does to `${{ secrets.X }}` and `${{ vars.X }}` before a step runs."""
    return EXPRESSION.sub(lambda match: variables[match[1]], text)


def stand_in_hosts(standin: StandIn) -> dict[str, str]:
    return {
        "APPCIRCLE_PROXY_APPCIRCLE__API_URL": standin.api_url,
        "APPCIRCLE_PROXY_APPCIRCLE__AUTH_URL": standin.auth_url,
    }


async def shell(
    shell: str, script: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        shell,
        "-e",
        "-c",
        script,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, output.decode()


@asynccontextmanager
async def service(
    runner: Runner, env: dict[str, str], address: str, work: Path
) -> AsyncIterator[dict[str, str]]:
    """The service container: the proxy from the wheel, as the image runs it, reached at
    `address` (host:port as the recipe writes it) through curl's connect-to. Yields the
    environment a step needs for that (CURL_HOME)."""
    install = await asyncio.create_subprocess_exec(
        "pip", "install", "-q", str(runner.wheel), env=env, stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(install.wait(), 300) == 0
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        "appcircle-proxy",
        "serve",
        env={**env, "APPCIRCLE_PROXY_SERVER__LISTEN": f"127.0.0.1:{port}"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    curl_home = work / "curl"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text(f'connect-to = "{address}:127.0.0.1:{port}"\n')
    try:
        yield {"CURL_HOME": str(curl_home)}
    finally:
        process.terminate()
        assert process.stderr is not None
        logged = (await asyncio.wait_for(process.stderr.read(), 30)).decode()
        await process.wait()
        assert PERSONAL_KEY not in logged and CLIENT_TOKEN not in logged


async def test_run_gives_the_command_the_proxy_but_not_the_key_and_passes_its_status_through(
    standin: StandIn, tmp_path: Path
) -> None:
    """`run -- CMD` starts the proxy on a free loopback port, gives CMD APPCIRCLE_PROXY_URL and
    APPCIRCLE_API_URL but not the key, exits with CMD's status, and stops the proxy with it."""
    # Zero-config, as a CI job would: the key in Appcircle's own variable, no file.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TEST_")},
        "APPCIRCLE_PERSONAL_ACCESS_KEY": PERSONAL_KEY,
        "UNRELATED": "kept",
    }
    report = tmp_path / "child.json"
    code, out, err = await appcircle_proxy(
        "run", "--api-url", standin.api_url, "--auth-url", standin.auth_url,
        "--", sys.executable, "-c", CHILD, str(report),
        env=env,
    )  # fmt: skip
    assert code == 7, err
    seen = json.loads(report.read_text())
    assert seen["organization"] == ROOT_ORG
    environ = seen["environ"]
    assert environ["APPCIRCLE_PROXY_URL"] == environ["APPCIRCLE_API_URL"]
    # A free loopback port, not the configured (here the default) 8787.
    assert environ["APPCIRCLE_PROXY_URL"].startswith("http://127.0.0.1:")
    assert not environ["APPCIRCLE_PROXY_URL"].endswith(":8787")
    assert environ["UNRELATED"] == "kept"
    assert "APPCIRCLE_PERSONAL_ACCESS_KEY" not in environ
    leaked = any(PERSONAL_KEY in v for v in environ.values())
    assert not leaked, "a key reached the command's environment"
    found = PERSONAL_KEY in out + err
    assert not found, "a secret went through"
    # The proxy is gone with the command.
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http:
            await http.get(environ["APPCIRCLE_PROXY_URL"] + "/_proxy/health")


def test_the_commands_environment_loses_every_variable_a_key_can_come_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """child_environment() drops every variable a key or client token can come from (secret_env
    names, APPCIRCLE_ key variables and their _FILE forms, APPCIRCLE_PROXY_ secrets in any case)
    and keeps the rest."""
    monkeypatch.setenv("MY_KEY", PERSONAL_KEY)
    monkeypatch.setenv("MY_CLIENT_TOKEN", CLIENT_TOKEN)
    document = proxy_config(
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
        credentials={"main": {"kind": "personal-access-key", "secret_env": "MY_KEY"}},
        server={"client_token_env": "MY_CLIENT_TOKEN"},
    )
    settings = load_settings(overrides=document, environment=False)
    environ = {
        name: "some value"
        for name in (
            "MY_KEY",
            "MY_CLIENT_TOKEN",
            "APPCIRCLE_PERSONAL_ACCESS_KEY",
            "APPCIRCLE_PERSONAL_ACCESS_KEY_FILE",
            "APPCIRCLE_PERSONAL_API_TOKEN",
            "APPCIRCLE_PERSONAL_API_TOKEN_FILE",
            "APPCIRCLE_API_KEY_SECRET",
            "APPCIRCLE_API_KEY_SECRET_FILE",
            "APPCIRCLE_PROXY_CREDENTIALS__MAIN__SECRET",
            "appcircle_proxy_server__client_token",
            "APPCIRCLE_PROXY_SERVER",
            "APPCIRCLE_PROXY_LOG__LEVEL",
            "APPCIRCLE_API_KEY_NAME",
            "HOME",
        )
    }
    environment = child_environment(settings, environ, "http://127.0.0.1:9/eu")
    assert sorted(environment) == [
        "APPCIRCLE_API_KEY_NAME",  # a name, not a secret
        "APPCIRCLE_API_URL",
        "APPCIRCLE_PROXY_CLIENT_TOKEN",
        "APPCIRCLE_PROXY_LOG__LEVEL",
        "APPCIRCLE_PROXY_TOKEN",  # the old name, deprecated
        "APPCIRCLE_PROXY_URL",
        "HOME",
    ]
    assert environment["APPCIRCLE_PROXY_URL"] == "http://127.0.0.1:9/eu"


async def test_run_drains_requests_still_in_flight_when_the_command_exits(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """When the command under `run` exits, a request a background job still has in flight is
    drained and answered 200, not cut off."""
    result = tmp_path / "status"
    # A background job the command leaves behind, its slow request still in flight.
    background = (
        "import os, sys, urllib.request\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "url = os.environ['APPCIRCLE_PROXY_URL'] + '/_test/slow?seconds=0.5'\n"
        "try:\n"
        "    status = str(opener.open(url).status)\n"
        "except Exception as err:\n"
        "    status = type(err).__name__\n"
        "open(sys.argv[1], 'w').write(status)\n"
    )
    command = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {background!r}, {str(result)!r}])\n"
        "time.sleep(0.3)\n"
    )
    config = write_config()
    code, _, err = await appcircle_proxy(
        "run", "--config", str(config), "--", sys.executable, "-c", command
    )
    assert code == 0, err
    await eventually(result.exists, within=5)
    assert result.read_text() == "200"


async def test_run_with_a_route_gives_its_prefix_and_a_client_token_opens_the_proxy(
    standin: StandIn,
    write_config: WriteConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`run --route eu` points APPCIRCLE_PROXY_URL at the route's prefix, and with a client token
    the command gets it as APPCIRCLE_PROXY_TOKEN while the variables it came from are removed."""
    monkeypatch.setenv("TEST_CLIENT_TOKEN", CLIENT_TOKEN)
    report = tmp_path / "child.json"
    config = write_config(routes=TWO_ROUTES, server={"client_token_env": "TEST_CLIENT_TOKEN"})
    code, _, err = await appcircle_proxy(
        "run", "--config", str(config), "--route", "eu", "--", sys.executable, "-c", CHILD,
        str(report),
    )  # fmt: skip
    assert code == 7, err
    seen = json.loads(report.read_text())
    assert seen["organization"] == SUB_ORG
    assert seen["environ"]["APPCIRCLE_PROXY_URL"].endswith("/eu")
    # The variable the client token came from is gone; the token itself only opens this proxy.
    assert "TEST_CLIENT_TOKEN" not in seen["environ"]
    assert "TEST_APPCIRCLE_KEY" not in seen["environ"]  # the credential's secret_env
    given = seen["environ"].get("APPCIRCLE_PROXY_CLIENT_TOKEN") == CLIENT_TOKEN
    assert given, "the command did not get the client token as APPCIRCLE_PROXY_CLIENT_TOKEN"


async def test_run_fails_with_the_reason_and_runs_nothing_when_a_route_gets_no_token(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """`run` exits 1 naming the route and the reason (key rejected, auth host unreachable within
    --timeout) and never starts the command when a route cannot get a token."""
    marker = tmp_path / "ran"
    touch = f"open({str(marker)!r}, 'w')"
    rejected = write_config(
        credentials={"main": {"kind": "personal-access-key", "secret": "not-the-key"}}
    )
    code, _, err = await appcircle_proxy(
        "run", "--config", str(rejected), "--", sys.executable, "-c", touch
    )
    assert code == 1
    assert "route 'default'" in err and "rejected" in err
    unreachable = write_config(appcircle={"auth_url": f"http://127.0.0.1:{free_port()}"})
    code, _, err = await appcircle_proxy(
        "run", "--config", str(unreachable), "--timeout", "0.5", "--", sys.executable, "-c", touch
    )
    assert code == 1
    assert "route 'default'" in err and "cannot be reached" in err
    assert not marker.exists()
    assert "Traceback" not in err


async def test_run_passes_signals_on_and_reports_a_killed_command_as_128_plus_its_signal(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`run` passes SIGTERM on to the command and exits with its status, and a command killed by
    a signal is reported as 128 plus the signal number."""
    config = write_config()
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('got SIGTERM', flush=True), "
        "sys.exit(3)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(config), "--",
        sys.executable, "-c", child,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        assert await asyncio.wait_for(process.stdout.readline(), 20) == b"ready\n"
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert out == b"got SIGTERM\n"
    assert process.returncode == 3
    code, _, _ = await appcircle_proxy(
        "run", "--config", str(config), "--", sys.executable, "-c",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    )  # fmt: skip
    assert code == 128 + signal.SIGKILL


async def test_run_without_a_command_or_with_a_missing_one_says_so(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`run` without a command or with an unknown --route exits 2, and with a command that does
    not exist exits 127, each with a message and no traceback."""
    config = str(write_config())
    code, _, err = await appcircle_proxy("run", "--config", config)
    assert code == 2 and "name the command after --" in err
    code, _, err = await appcircle_proxy("run", "--config", config, "--route", "nope", "--", "true")
    assert code == 2 and "no route named 'nope'" in err
    code, _, err = await appcircle_proxy("run", "--config", config, "--", "no-such-command-here")
    assert code == 127 and "cannot run no-such-command-here" in err
    assert "Traceback" not in err


async def test_run_with_json_logs_writes_every_line_as_json(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`run --log-format json` for a log pipeline: the "serving ... for CMD" line and the
    refusal of a missing command are JSON objects like every other line."""
    config = str(write_config())
    code, out, err = await appcircle_proxy(
        "run", "--config", config, "--log-format", "json", "--", "true"
    )
    assert code == 0, err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert any("serving" in line for line in lines), lines
    entries = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    serving = next(entry for entry in entries if entry.get("event") == "serving")
    assert serving["url"].startswith("http://127.0.0.1:") and serving["command"] == ["true"]
    code, _, err = await appcircle_proxy(
        "run", "--config", config, "--log-format", "json", "--", "no-such-command-here"
    )
    assert code == 127
    assert "cannot run no-such-command-here" in json.loads(err.strip().splitlines()[-1])["message"]


async def test_wait_exits_0_once_the_proxy_is_ready(
    start_proxy: StartProxy, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wait --url` exits 0 and says the proxy is ready once /_proxy/ready answers 200."""
    proxy = await start_proxy(server={"eager": True})
    code, _, err = await appcircle_proxy("wait", "--url", proxy, "--timeout", "10")
    assert (code, err.strip()) == (0, f"appcircle-proxy: {proxy} is ready")


async def test_wait_exits_1_with_the_reason_when_the_proxy_is_not_ready_in_time(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """`wait` exits 1 after --timeout with the reason: the route whose key was rejected, or no
    answer at all."""
    standin.always = 401
    proxy = await start_proxy(server={"eager": True})
    code, _, err = await appcircle_proxy("wait", "--url", proxy, "--timeout", "0.5")
    assert code == 1
    assert "is not ready after 0.5 s" in err
    assert "route 'default'" in err and "rejected" in err
    nobody = f"http://127.0.0.1:{free_port()}"
    code, _, err = await appcircle_proxy("wait", "--url", nobody, "--timeout", "0.3")
    assert code == 1 and "no answer" in err


async def test_wait_finds_the_proxy_and_its_client_token_in_the_configuration(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`wait --config` finds the proxy's address and client token in the configuration; with
    --url it needs APPCIRCLE_PROXY_TOKEN and says so when it is missing."""
    port = free_port()
    config = write_config(
        server={"listen": f"127.0.0.1:{port}", "eager": True, "client_token": CLIENT_TOKEN}
    )
    running = await start(load_settings(config))
    try:
        code, _, err = await appcircle_proxy("wait", "--config", str(config), "--timeout", "10")
        assert code == 0, err
        # With --url and no token, the reason says what is missing.
        code, _, err = await appcircle_proxy(
            "wait", "--url", f"http://127.0.0.1:{port}", "--timeout", "0.3"
        )
        assert code == 1 and "APPCIRCLE_PROXY_CLIENT_TOKEN" in err
        code, _, err = await appcircle_proxy(
            "wait", "--url", f"http://127.0.0.1:{port}", "--timeout", "5",
            env={**os.environ, "APPCIRCLE_PROXY_CLIENT_TOKEN": CLIENT_TOKEN},
        )  # fmt: skip
        assert code == 0, err
    finally:
        await running.stop()


async def test_wait_asks_the_admin_listener_which_needs_no_token_nor_the_key_here(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """With server.admin_listen set, `wait --config` asks the admin listener, so it needs neither
    the client token nor the key in its environment."""
    config = write_config(
        server={
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "eager": True,
            "client_token": CLIENT_TOKEN,
        }
    )
    running = await start(load_settings(config))
    # As a job beside a proxy service would: with its configuration, without its key.
    without_key = {k: v for k, v in os.environ.items() if not k.startswith("TEST_")}
    try:
        code, _, err = await appcircle_proxy(
            "wait", "--config", str(config), "--timeout", "10", env=without_key
        )
        assert code == 0, err
        assert running.admin_urls[0] in err
    finally:
        await running.stop()


async def test_health_and_wait_with_url_need_no_key_nor_configuration(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """The quick start's second shell: `health --url` and `wait --url` probe a running proxy
    with no key and no configuration anywhere; a client token goes in by the one name,
    APPCIRCLE_PROXY_CLIENT_TOKEN; the old APPCIRCLE_PROXY_TOKEN still works, deprecated."""
    port = free_port()
    config = write_config(
        server={"listen": f"127.0.0.1:{port}", "eager": True, "client_token": CLIENT_TOKEN}
    )
    running = await start(load_settings(config))
    url = f"http://127.0.0.1:{port}"
    env = no_key_nor_config()
    try:
        code, out, err = await appcircle_proxy("health", "--url", url, env=env)
        assert code == 0, err
        assert out.strip() == f"ok: {url}/_proxy/health"
        code, _, err = await appcircle_proxy(
            "wait", "--url", url, "--timeout", "5",
            env={**env, "APPCIRCLE_PROXY_CLIENT_TOKEN": CLIENT_TOKEN},
        )  # fmt: skip
        assert code == 0, err
        code, _, err = await appcircle_proxy(
            "wait", "--url", url, "--timeout", "5",
            env={**env, "APPCIRCLE_PROXY_TOKEN": CLIENT_TOKEN},
        )  # fmt: skip
        assert code == 0 and "APPCIRCLE_PROXY_TOKEN is deprecated" in err, err
        code, _, err = await appcircle_proxy("health", "--url", "127.0.0.1:1", env=env)
        assert code == 2 and "not an http(s) URL" in err
    finally:
        await running.stop()
    code, _, err = await appcircle_proxy("health", "--url", url, "--timeout", "1", env=env)
    assert code == 1 and "cannot connect" in err


async def test_health_finds_the_proxy_from_the_environment_without_any_key(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`health` with no --url reads where the proxy listens and needs no credential at all:
    the key may be on the proxy's own command line alone (the quick start)."""
    port = free_port()
    config = write_config(server={"listen": f"127.0.0.1:{port}", "eager": True})
    running = await start(load_settings(config))
    env = {**no_key_nor_config(), "APPCIRCLE_PROXY_SERVER__LISTEN": f"127.0.0.1:{port}"}
    try:
        code, out, err = await appcircle_proxy("health", env=env)
        assert code == 0, err
        assert out.strip() == f"ok: http://127.0.0.1:{port}/_proxy/health"
        code, _, err = await appcircle_proxy("wait", "--timeout", "5", env=env)
        assert code == 0, err
    finally:
        await running.stop()


def test_every_help_text_about_the_client_token_names_both_headers() -> None:
    """A client token may travel in Authorization or Proxy-Authorization: every help text
    that mentions it says both, and names APPCIRCLE_PROXY_CLIENT_TOKEN, never the old name."""
    from proxy.cli.main import _parser

    parser, subparsers = _parser()
    texts = [parser.format_help()] + [sub.format_help() for sub in subparsers.values()]
    about_tokens = [" ".join(text.split()) for text in texts if "token" in text.lower()]
    mentioning = [
        text for text in about_tokens if "client token" in text or "--client-token" in text
    ]
    assert len(mentioning) >= 3
    for text in mentioning:
        assert "Authorization" in text.replace("Proxy-Authorization", ""), text
        assert "Proxy-Authorization" in text, text
    assert not any("APPCIRCLE_PROXY_TOKEN" in text for text in texts)


async def test_run_imports_nothing_a_cold_start_does_not_need(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`run -- CMD` starts in every CI step, so its start-up is the job's time: it must not
    import what it never uses (PyJWT and cryptography: 30-70 ms; uvloop, which `run` does
    not run on; prometheus-client, until a scrape; multiprocessing's pool machinery)."""
    config = str(write_config())
    code, _, err = await appcircle_proxy("run", "--config", config, "--", "true")
    assert code == 0, err
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "importtime", "-m", "proxy", "run", "--config", config, "--", "true",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err_bytes = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err_bytes.decode()
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in err_bytes.decode().splitlines()
        if line.startswith("import time:")
    }
    assert "proxy.serve.server" in imported  # the listing is what it seems
    unneeded = {"jwt", "cryptography", "uvloop", "prometheus_client"} & imported
    assert not unneeded, f"run imported {sorted(unneeded)}"


def test_every_ci_recipe_in_the_readme_is_run_by_these_tests() -> None:
    """A recipe added to the README's CI section without a marker, or with one these tests
    do not run, would go untested."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## CI jobs") :]
    section = section[: section.index("\n## ")]
    assert section.count("```yaml") == len([n for n in TESTED if n != "build-wheel"])
    assert set(recipes()) == TESTED
    assert "git+" not in section and "git clone" not in section


@pytest.mark.timeout(300)
async def test_github_run_recipe_installs_the_wheel_and_runs_the_step(
    bare_runner: Runner, standin: StandIn, tmp_path: Path
) -> None:
    """GitHub Actions with `appcircle-proxy run`: variables come in through each step's
    `env:` (never `${{ }}` inside `run:`), the install needs no git, and the upload goes
    through the proxy with the key in the proxy's step only."""
    steps: list[dict[str, Any]] = yaml.safe_load(recipes()["github-run"])
    variables = ci_variables(bare_runner)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "app.ipa").write_bytes(b"an app")
    outputs = []
    for step in steps:
        if "uses" in step:
            assert step["uses"].startswith("actions/setup-python@")
            continue
        assert "${{" not in step["run"], "GitHub variables go through env:, not into the script"
        env = {name: expand(str(value), variables) for name, value in step.get("env", {}).items()}
        environment = {
            **bare_environment(bare_runner.path, tmp_path),
            **stand_in_hosts(standin),
            **env,
        }
        status, output = await shell("bash", step["run"], environment, tmp_path, timeout=300)
        assert status == 0, output
        outputs.append(output)
    (uploaded,) = [r for r in standin.api_requests if r.method == "POST"]
    assert uploaded.raw_path == f"/distribution/v2/profiles/{PROFILE_ID}/app-versions"
    assert all(PERSONAL_KEY not in output for output in outputs)


@pytest.mark.timeout(300)
async def test_github_run_recipe_names_the_missing_variable(
    bare_runner: Runner, tmp_path: Path
) -> None:
    """An unset wheel variable stops the install step with its name, not pip's riddle."""
    (install,) = [s for s in yaml.safe_load(recipes()["github-run"]) if "pip install" in str(s)]
    environment = bare_environment(bare_runner.path, tmp_path)
    status, output = await shell("bash", install["run"], environment, tmp_path)
    assert status != 0
    assert "APPCIRCLE_PROXY_WHEEL" in output


@pytest.mark.timeout(300)
async def test_gitlab_run_recipe_runs_on_a_bare_python_image(
    bare_runner: Runner, standin: StandIn, tmp_path: Path
) -> None:
    """GitLab CI with `appcircle-proxy run` on python:3.11-slim (no git, no curl): the
    script lines in one shell, the job's script gets the proxy and never the key."""
    (job,) = yaml.safe_load(recipes()["gitlab-run"]).values()
    assert job["image"] == "python:3.11-slim"
    script = tmp_path / "ci" / "upload.sh"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\nset -e\n"
        'test -z "$APPCIRCLE_PERSONAL_ACCESS_KEY"\n'
        "python3 -c 'import os, urllib.request; print(urllib.request.urlopen("
        'os.environ["APPCIRCLE_PROXY_URL"] + "/build/v2/profiles").status)\'\n'
    )
    script.chmod(0o755)
    environment = {
        **bare_environment(bare_runner.path, tmp_path),
        **stand_in_hosts(standin),
        **ci_variables(bare_runner),
        **job.get("variables", {}),
    }
    status, output = await shell("sh", "\n".join(job["script"]), environment, tmp_path, 300)
    assert status == 0, output
    assert "\n200\n" in output  # what upload.sh printed
    assert [r.raw_path for r in standin.api_requests] == ["/build/v2/profiles"]


@pytest.mark.timeout(300)
async def test_github_service_recipe_publishes_on_loopback_only_and_its_steps_run(
    bare_runner: Runner, standin: StandIn, tmp_path: Path
) -> None:
    """GitHub Actions with the proxy as a service: its port is published on the runner's
    loopback alone; the steps, curl only, wait for readiness and call the API."""
    (job,) = yaml.safe_load(recipes()["github-service"])["jobs"].values()
    (container,) = job["services"].values()
    (mapping,) = container["ports"]
    assert mapping.startswith("127.0.0.1:"), "a service port published on every interface"
    host_port = mapping.rsplit(":", 1)[0]
    variables = ci_variables(bare_runner)
    base = {**bare_environment(bare_runner.path, tmp_path), **stand_in_hosts(standin)}
    service_env = {k: expand(str(v), variables) for k, v in container["env"].items()}
    async with service(bare_runner, {**base, **service_env}, host_port, tmp_path) as reach:
        for step in job["steps"]:
            status, output = await shell("bash", step["run"], {**base, **reach}, tmp_path)
            assert status == 0, output
    assert [r.raw_path for r in standin.api_requests] == ["/build/v2/profiles"]


@pytest.mark.timeout(300)
async def test_gitlab_service_recipe_is_guarded_by_a_client_token_and_its_script_runs(
    bare_runner: Runner, standin: StandIn, tmp_path: Path
) -> None:
    """GitLab CI with the proxy as a service, reached by its alias (not loopback): the
    service gets the job's variables, client token included, and refuses a request
    without it; the job's curl lines, with it, wait for readiness and call the API."""
    (job,) = yaml.safe_load(recipes()["gitlab-service"]).values()
    (service_entry,) = job["services"]
    # The client token: a masked CI/CD variable, as the recipe says.
    variables = {
        **ci_variables(bare_runner),
        "APPCIRCLE_PROXY_SERVER__CLIENT_TOKEN": CLIENT_TOKEN,
        **job["variables"],
    }
    base = {**bare_environment(bare_runner.path, tmp_path), **stand_in_hosts(standin)}
    address = f"{service_entry['alias']}:8787"
    async with service(bare_runner, {**base, **variables}, address, tmp_path) as reach:
        status, output = await shell(
            "sh", "\n".join(job["script"]), {**base, **variables, **reach}, tmp_path
        )
        assert status == 0, output
        status, output = await shell(
            "sh",
            f"curl -sS -o /dev/null -w '%{{http_code}}' http://{address}/build/v2/profiles",
            {**base, **reach},
            tmp_path,
        )
        assert output == "407", "the service answered a request without the client token"
    assert [r.raw_path for r in standin.api_requests] == ["/build/v2/profiles"]
