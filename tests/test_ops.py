"""Operable out of the box: the demo whatever the shell holds, logs a pipeline can parse,
errors that name the fix, `health`, `check --offline`, the command line's help and flags,
and examples that work when followed literally."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import tomli_w
import yaml

from proxy import __version__
from proxy.config.errors import ConfigError
from proxy.config.load import load_settings
from proxy.config.settings import ServerSettings
from proxy.serve.server import start
from tests.standin import StandIn

from .conftest import (
    CLIENT_TOKEN,
    INLINE_KEY_CONFIG,
    PERSONAL_KEY,
    PERSONAL_KEY_CONFIG,
    StartProxy,
    WriteConfig,
)
from .support import request

ROOT = Path(__file__).parent.parent

ZERO_CONFIG = (
    "APPCIRCLE_PERSONAL_ACCESS_KEY",
    "APPCIRCLE_PERSONAL_API_TOKEN",
    "APPCIRCLE_API_KEY_NAME",
    "APPCIRCLE_API_KEY_SECRET",
    "APPCIRCLE_SUB_ORGANIZATION",
)


@pytest.fixture(autouse=True)
def no_outside_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("APPCIRCLE_"):
            monkeypatch.delenv(name)


def environment(**variables: str) -> dict[str, str]:
    """This process's environment (no APPCIRCLE_ variables: see above) plus `variables`."""
    return os.environ | variables


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or environment(),
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def serve_then_stop(
    *args: str, requests: Callable[[str], Awaitable[None]], listeners: int = 1
) -> tuple[str, str]:
    """Run `appcircle-proxy ARGS` until `listeners` processes say they listen, call
    `requests(url)`, stop it with SIGTERM; return all it wrote to stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        first = ""
        while first.count("listening on") < listeners:
            line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
            assert line, "the proxy exited before it listened"
            first += line
        match = re.search(r"listening on (http://\S+)", first)
        assert match, first
        await requests(match.group(1))
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode == 0, err
    return first + out.decode(), err.decode()


def json_lines(text: str) -> list[dict[str, object]]:
    """Every line of `text` as a JSON object; fails on any line that is not one."""
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


# The demo


async def test_the_demo_ignores_a_real_key_in_the_shell_and_logs_its_traffic(
    unused_tcp_port: int, http: aiohttp.ClientSession
) -> None:
    """`demo` ignores APPCIRCLE_PERSONAL_ACCESS_KEY and APPCIRCLE_PROXY_ variables in the shell,
    serves on its --listen address, logs token and access lines, and never prints the real key."""
    url = f"http://127.0.0.1:{unused_tcp_port}"

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--listen",
        f"127.0.0.1:{unused_tcp_port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(
            APPCIRCLE_PERSONAL_ACCESS_KEY=PERSONAL_KEY,
            APPCIRCLE_PROXY_SERVER__LISTEN="127.0.0.1:1",
        ),
    )
    assert process.stdout is not None
    try:
        text = ""
        while "Ctrl-C" not in text:
            line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
            assert line, "the demo exited before it was ready"
            text += line
        assert (await request(http, "GET", f"{url}/build/v2/profiles")).status == 200
    finally:
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    out, err = stdout.decode(), stderr.decode()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert "obtained session token" in err  # token lines
    assert re.search(r"GET /build/v2/profiles .*status=200", err)  # access lines
    assert PERSONAL_KEY not in text + out + err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("demo", "--config", "proxy.toml"), "unrecognized arguments: --config"),
        (("--workers", "2", "demo"), "--workers does not apply to 'demo'"),
        (("--api-url", "https://api.example.com", "demo"), "--api-url does not apply to 'demo'"),
    ],
)
async def test_the_demo_refuses_flags_it_cannot_honour(args: tuple[str, ...], named: str) -> None:
    """`demo` refuses --config, --workers and --api-url with exit 2 and a one-line message naming
    the flag, rather than silently ignoring them."""
    code, out, err = await run(*args)
    assert code == 2
    assert named in err
    assert "Traceback" not in err and out == ""


# Logs


async def test_in_json_every_line_from_start_to_exit_is_one_object_with_lifecycle_events(
    standin: StandIn, write_config: WriteConfig, http: aiohttp.ClientSession
) -> None:
    """With --log-format json every stdout and stderr line is a JSON object, and stdout carries
    exactly the listening (with routes) and stopped (with request and exchange counts) events."""
    config = write_config()

    async def traffic(url: str) -> None:
        assert (await request(http, "GET", f"{url}/build/v2/profiles")).status == 200
        assert (await request(http, "GET", f"{url}/build/v2/profiles")).status == 200

    out, err = await serve_then_stop(
        "--config", str(config), "--log-format", "json", requests=traffic
    )
    events = json_lines(out)
    logged = json_lines(err)
    assert [event["event"] for event in events] == ["listening", "stopped"]
    listening, stopped = events
    assert str(listening["address"]).startswith("http://127.0.0.1:")
    assert listening["routes"] == [
        {
            "route": "default",
            "prefix": "/",
            "credential": "main",
            "kind": "personal-access-key",
            "sub_organization": None,
            "upstream": listening["api_url"],
        }
    ]
    assert (stopped["requests"], stopped["token_exchanges"]) == (2, 1)
    assert stopped["token_exchange_failures"] == 0
    assert any("obtained session token" in str(entry["message"]) for entry in logged)


async def test_in_text_the_banner_and_the_stopped_line_stay_readable(
    standin: StandIn, write_config: WriteConfig, http: aiohttp.ClientSession
) -> None:
    """In text format the first line is the version and listen address, then the routes, and the
    last line sums up requests, token exchanges, failures and uptime."""

    async def traffic(url: str) -> None:
        assert (await request(http, "GET", f"{url}/x")).status == 200
        assert (await request(http, "GET", f"{url}/y")).status == 200

    out, _ = await serve_then_stop("--config", str(write_config()), requests=traffic)
    lines = out.splitlines()
    assert re.fullmatch(rf"appcircle-proxy {__version__} listening on http://\S+", lines[0])
    assert lines[1] == "routes:"
    assert re.fullmatch(
        r"appcircle-proxy: stopped after 2 requests and 1 token exchanges \(0 failed\), up \d+ s",
        lines[-1],
    )


async def test_with_workers_every_line_says_which_worker(
    standin: StandIn, write_config: WriteConfig, unused_tcp_port: int, http: aiohttp.ClientSession
) -> None:
    """With --workers 2 and JSON logs every line carries its worker number, each worker logs its own
    listening and stopped events, and their request counts add up to the traffic sent."""
    config = write_config()

    async def traffic(url: str) -> None:
        for _ in range(4):
            assert (await request(http, "GET", f"{url}/x")).status == 200

    out, err = await serve_then_stop(
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{unused_tcp_port}",
        "--workers",
        "2",
        "--log-format",
        "json",
        requests=traffic,
        listeners=2,
    )
    entries = json_lines(out) + json_lines(err)
    assert entries
    assert all(entry.get("worker") in (0, 1) for entry in entries), entries
    for event in ("listening", "stopped"):
        workers = [entry["worker"] for entry in entries if entry.get("event") == event]
        assert sorted(workers) == [0, 1], event  # type: ignore[type-var]
    stopped = [entry for entry in entries if entry.get("event") == "stopped"]
    assert sum(int(entry["requests"]) for entry in stopped) == 4  # type: ignore[call-overload]


async def test_debug_logs_upstream_connections_and_exchange_timings(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture, http: aiohttp.ClientSession
) -> None:
    """At debug level the upstream logger records each token exchange with its timing and each new
    connection, and two API requests open one kept-alive API connection."""
    proxy = await start_proxy()  # every test logs at debug level
    assert (await request(http, "GET", f"{proxy}/build/v2/profiles")).status == 200
    assert (await request(http, "GET", f"{proxy}/build/v2/profiles")).status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "appcircle_proxy.upstream"]
    exchange = r"auth POST /auth/v3/token answered 200 in [\d.]+ ms"
    assert any(re.fullmatch(exchange, m) for m in lines)
    assert any(m.startswith("auth new connection in") for m in lines)
    # Two requests, one connection to the API: it was kept alive.
    assert len([m for m in lines if re.fullmatch(r"api new connection in [\d.]+ ms.*", m)]) == 1


# Errors that name the fix


def test_a_list_setting_in_the_environment_takes_commas_or_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A list setting such as APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS takes a comma-separated list or
    a JSON array from the environment, with host names lower-cased."""
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "pak_example")
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS", "appcircle-proxy, Proxy.Internal")
    assert load_settings().server.allowed_hosts == ("appcircle-proxy", "proxy.internal")
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS", '["appcircle-proxy"]')
    assert load_settings().server.allowed_hosts == ("appcircle-proxy",)
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__ALLOWED_ORIGINS", "http://localhost:3000")
    assert load_settings().server.allowed_origins == ("http://localhost:3000",)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS", '["a", ', "comma-separated list (a,b) or JSON"),
        ("APPCIRCLE_PROXY_ROUTES", "{not json", "a table takes a JSON object"),
    ],
)
def test_an_unreadable_environment_value_names_the_variable_and_the_format(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    """An environment value that cannot be parsed raises a ConfigError naming the variable and the
    expected format, not pydantic's internal EnvSettingsSource."""
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "pak_example")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert variable in message and expected in message
    assert "EnvSettingsSource" not in message


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"APPCIRCLE_API_KEY_SECRET": "s"}, "APPCIRCLE_API_KEY_NAME"),
        ({"APPCIRCLE_API_KEY_NAME": "bot"}, "APPCIRCLE_API_KEY_SECRET"),
        (
            {"APPCIRCLE_PERSONAL_ACCESS_KEY": "k", "APPCIRCLE_SUB_ORGANIZATION": "eu"},
            "APPCIRCLE_SUB_ORGANIZATION",
        ),
        (
            {"APPCIRCLE_PERSONAL_ACCESS_KEY_FILE": "/no/such/key"},
            "APPCIRCLE_PERSONAL_ACCESS_KEY_FILE",
        ),
    ],
)
def test_zero_config_mistakes_name_the_variables_the_user_set(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    """A half-set or wrong zero-config environment (API key name without secret, sub-organization
    with a personal key, a missing key file) names the APPCIRCLE_ variable, not APPCIRCLE_PROXY_
    ones."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert named in str(raised.value)
    assert "APPCIRCLE_PROXY_" not in str(raised.value)


@pytest.mark.parametrize(
    "variables",
    [
        {"APPCIRCLE_PERSONAL_ACCESS_KEY": "k", "APPCIRCLE_PERSONAL_API_TOKEN": "t"},
        {"APPCIRCLE_PERSONAL_ACCESS_KEY": "k", "APPCIRCLE_API_KEY_NAME": "b"},
        {"APPCIRCLE_PERSONAL_API_TOKEN": "t", "APPCIRCLE_API_KEY_SECRET_FILE": "/s"},
        {"APPCIRCLE_PERSONAL_ACCESS_KEY": "k", "APPCIRCLE_PERSONAL_ACCESS_KEY_FILE": "/k"},
    ],
)
def test_two_keys_at_once_are_refused_in_one_line_naming_both(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    """Two zero-config keys set at once are refused with a one-line ConfigError naming both
    variables, instead of one silently winning."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert "\n" not in message
    for name in variables:
        assert name in message


def test_zero_config_variables_beside_a_config_file_are_refused_unless_it_uses_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An APPCIRCLE_ zero-config variable set beside a config file is refused unless the file names
    it (as a secret_env), so the user is never unsure which key is in use."""
    config = tmp_path / "proxy.toml"
    config.write_text(tomli_w.dumps({"credentials": PERSONAL_KEY_CONFIG}))  # TEST_APPCIRCLE_KEY
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "pak_other")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert "APPCIRCLE_PERSONAL_ACCESS_KEY set beside the config file" in str(raised.value)
    uses_it = {
        "main": {"kind": "personal-access-key", "secret_env": "APPCIRCLE_PERSONAL_ACCESS_KEY"}
    }
    config.write_text(tomli_w.dumps({"credentials": uses_it}))
    assert load_settings(config).credentials["main"].secret_env == "APPCIRCLE_PERSONAL_ACCESS_KEY"
    monkeypatch.setenv("APPCIRCLE_SUB_ORGANIZATION", "x")
    with pytest.raises(ConfigError, match="APPCIRCLE_SUB_ORGANIZATION set beside"):
        load_settings(config)


async def test_check_and_token_promise_no_retry_they_will_not_make(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """When the auth host answers 503, `check` and `token` exit 1 without saying "retrying in":
    one-shot commands promise no retry they will not make."""
    standin.always = 503
    config = str(write_config())
    code, out, err = await run("check", "--config", config)
    assert code == 1 and out.startswith("FAIL /")
    assert "retrying in" not in out + err
    code, out, err = await run("token", "--config", config)
    assert code == 1 and "route 'default'" in err
    assert "retrying in" not in out + err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--listen", "unix:/no/such/dir/p.sock"), "cannot listen on unix:/no/such/dir/p.sock"),
        (("--listen", "example.invalid:8787"), "cannot listen on example.invalid:8787"),
        (("--admin-listen", "example.invalid:9090"), "cannot listen on example.invalid:9090"),
    ],
)
async def test_a_listen_failure_names_the_address_and_the_setting(
    write_config: WriteConfig, flags: tuple[str, str], named: str
) -> None:
    """A --listen or --admin-listen address that cannot be bound exits 2 with one line naming the
    address and the flag, not a traceback."""
    code, out, err = await run("--config", str(write_config()), *flags)
    assert code == 2
    assert named in err and flags[0] in err
    assert "Traceback" not in err and out == ""


async def test_admin_listen_on_the_listen_address_is_refused_at_validation(
    write_config: WriteConfig,
) -> None:
    """server.admin_listen on the same port as server.listen is refused by `config` with exit 2 and
    a message naming both, before anything tries to bind."""
    config = str(write_config())
    args = ("--listen", "0.0.0.0:8999", "--admin-listen", "127.0.0.1:8999")
    code, _, err = await run("config", "--config", config, *args)
    assert code == 2
    assert "server.admin_listen: admin_listen (127.0.0.1:8999) is the listen address" in err


# What was missing


async def test_check_offline_validates_a_deployment_config_without_its_secrets(
    tmp_path: Path,
) -> None:
    """`check --offline` validates config.example.toml without its secrets, saying where each secret
    will come from; online `check` needs them, and a structural error still exits 2 offline."""
    config = tmp_path / "deploy.toml"
    config.write_text((ROOT / "config.example.toml").read_text())  # its secrets are not here
    code, out, err = await run("check", "--offline", "--config", str(config))
    assert code == 0, err
    assert "configuration is valid" in out
    assert "credentials.me: variable APPCIRCLE_PERSONAL_ACCESS_KEY" in out
    assert "credentials.ci: file /run/secrets/appcircle-api-key" in out
    code, out, err = await run("check", "--config", str(config))
    assert code == 2  # online, the secrets must be there
    config.write_text('[credentials.main]\nkind = "api-key"\nsecret_env = "X"\n')
    code, _, err = await run("check", "--offline", "--config", str(config))
    assert code == 2 and "needs name" in err


async def test_health_finds_the_running_proxy_from_the_same_configuration(
    standin: StandIn, write_config: WriteConfig, unused_tcp_port_factory: Callable[[], int]
) -> None:
    """`health` finds the running proxy from the same config: on server.admin_listen when set,
    otherwise on the API listener past its client token, without needing the secrets."""
    port, admin_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    listen = {"server": {"listen": f"127.0.0.1:{port}"}}
    env = environment(APPCIRCLE_PROXY_SERVER__LISTEN=f"127.0.0.1:{port}")
    config = write_config(server={"admin_listen": f"0.0.0.0:{admin_port}"})
    code, _, err = await run("health", "--config", str(config), env=env)
    assert code == 1
    assert f"http://127.0.0.1:{admin_port}/_proxy/health (server.admin_listen)" in err
    running = await start(load_settings(config, listen))
    try:
        code, out, err = await run("health", "--config", str(config), env=env)
        assert code == 0, err
        assert f"http://127.0.0.1:{admin_port}/_proxy/health" in out
    finally:
        await running.stop()
    # No admin listener: it asks the API listener, past its client token, and needs none of
    # the secrets (the key file is not here).
    config = write_config(server={"client_token": CLIENT_TOKEN})
    running = await start(load_settings(config, listen))
    try:
        code, out, err = await run(
            "health",
            env=env | {"APPCIRCLE_PERSONAL_ACCESS_KEY_FILE": "/run/secrets/not-here"},
        )
        assert code == 0, err
        assert f"http://127.0.0.1:{port}/_proxy/health" in out
    finally:
        await running.stop()


async def test_each_command_has_its_own_help_with_only_its_flags() -> None:
    """Each command's --help lists only the flags it takes, a flag for another command exits 2
    naming it, and -V prints the version."""
    code, out, _ = await run("token", "--help")
    assert code == 0
    assert "Obtain one session token" in out
    assert "--route" in out
    for flag in ("--workers", "--listen", "--offline"):
        assert flag not in out
    code, out, _ = await run("health", "--help")
    assert "--admin-listen" in out and "--workers" not in out
    code, _, err = await run("--workers", "2", "token")
    assert code == 2 and "--workers does not apply to 'token'" in err
    code, out, _ = await run("-V")
    assert (code, out.strip()) == (0, f"appcircle-proxy {__version__}")


async def test_every_setting_a_user_reaches_for_has_a_flag(tmp_path: Path) -> None:
    """--log-format, --admin-listen and --client-token-file reach the effective config shown by
    `config`, and the client token itself is never printed."""
    token_file = tmp_path / "client-token"
    token_file.write_text(CLIENT_TOKEN)
    code, out, err = await run(
        "config",
        "--log-format",
        "json",
        "--admin-listen",
        "127.0.0.1:9090",
        "--client-token-file",
        str(token_file),
        env=environment(APPCIRCLE_PERSONAL_ACCESS_KEY="pak_example"),
    )
    assert code == 0, err
    effective = json.loads(out)
    assert effective["log"]["format"] == "json"
    assert effective["server"]["admin_listen"] == "127.0.0.1:9090"
    assert effective["server"]["client_token_file"] == str(token_file)
    assert CLIENT_TOKEN not in out


# The examples, followed literally


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


async def test_in_json_mode_even_a_refusal_to_start_is_one_json_object(tmp_path: Path) -> None:
    """In JSON log mode a config error that stops start-up is written as exactly one JSON line at
    level error, naming the setting, with exit 2."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nlisten = 42\n", encoding="utf-8")
    code, out, err = await run("--log-format", "json", "--config", str(broken))
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error" and "server.listen" in entry["message"]


async def test_in_json_mode_the_supervisors_own_refusal_is_json(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """In JSON log mode the supervisor's own refusal (--workers without a fixed TCP port) is logged
    as JSON too, with exit 2."""
    config = write_config(credentials=INLINE_KEY_CONFIG, log={"format": "json"})
    code, _, err = await run("--config", str(config), "--workers", "2")
    assert code == 2
    lines = [json.loads(line) for line in err.splitlines()]
    assert any("--workers needs a fixed TCP port" in entry["message"] for entry in lines)
