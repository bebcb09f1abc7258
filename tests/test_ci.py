"""CI lifecycles as a job runs them: `appcircle-proxy run -- CMD` and `appcircle-proxy wait`,
real processes against the stand-in Appcircle."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.cli.ci import child_environment
from proxy.config.load import load_settings
from proxy.serve.server import start
from tests.standin import StandIn

from .conftest import (
    CLIENT_TOKEN,
    PERSONAL_KEY,
    ROOT_ORG,
    SUB_ORG,
    StartProxy,
    WriteConfig,
)
from .support import eventually, proxy_config

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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- run --------------------------------------------------------------------------------


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


# -- wait -------------------------------------------------------------------------------


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


def no_key_nor_config() -> dict[str, str]:
    """A second shell's environment: no key (it was on the proxy's command line), no file."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("APPCIRCLE_", "TEST_"))
    }


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
