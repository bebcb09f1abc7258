"""The command line as a user runs it: real processes, real signals, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import jwt
import pytest

from proxy import __version__
from proxy.config.load import load_settings
from proxy.serve.server import start
from tests.support.standin import StandIn

from .conftest import (
    CLIENT_TOKEN,
    INLINE_KEY_CONFIG,
    PERSONAL_KEY,
    ROOT_ORG,
    SUB_ORG,
    WriteConfig,
)
from .support import request
from .support.processes import run

TWO_ROUTES = {
    "root": {"prefix": "/", "credential": "main"},
    "eu": {"prefix": "/eu", "credential": "main", "sub_organization": SUB_ORG},
}


def environment(**variables: str) -> dict[str, str]:
    """This process's environment (no APPCIRCLE_ variables: see above) plus `variables`."""
    return os.environ | variables


async def test_version_and_help() -> None:
    """--version prints "appcircle-proxy <version>" and --help lists the serve, check and token
    commands, both exiting 0."""
    code, out, _ = await run("--version")
    assert (code, out.strip()) == (0, f"appcircle-proxy {__version__}")
    code, out, _ = await run("--help")
    assert code == 0
    for command in ("serve", "check", "token"):
        assert command in out


async def test_bad_config_exits_2_without_a_traceback(tmp_path: Path) -> None:
    """A config naming an unset secret_env makes `serve` exit 2 with a message naming the
    variable and the file, no traceback and nothing on stdout."""
    path = tmp_path / "proxy.toml"
    path.write_text('[credentials.main]\nkind = "personal-access-key"\nsecret_env = "UNSET_VAR"')
    code, out, err = await run("serve", "--config", str(path))
    assert code == 2
    assert "Traceback" not in err
    assert "UNSET_VAR" in err and str(path) in err
    assert out == ""


async def test_check_reports_each_route_with_org_and_expiry(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`check` prints one ok line per route with its prefix, credential, organization and token
    expiry, and never prints the key or a token."""
    code, out, err = await run("check", "--config", str(write_config(routes=TWO_ROUTES)))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 5
    assert re.match(
        r"ok +/ +route 'root', personal-access-key 'main': organization " + ROOT_ORG, lines[0]
    )
    assert re.match(
        r"ok +/eu +route 'eu', .*organization " + SUB_ORG + ", token expires 20", lines[1]
    )
    # The key exchanges the proxy answers itself, under each prefix (issue 18).
    assert lines[2].startswith("key exchanges answered here")
    assert lines[3] == (
        "  POST /auth/v1/token, /auth/v2/token, /auth/v3/token, /auth/v1/api-key/token"
    )
    assert lines[4] == (
        "  POST /eu/auth/v1/token, /eu/auth/v2/token, /eu/auth/v3/token, /eu/auth/v1/api-key/token"
    )
    assert PERSONAL_KEY not in out + err
    for token in standin.issued_tokens:
        assert token not in out + err


async def test_check_fails_with_exit_1_naming_the_broken_route(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`check` exits 1 when a route cannot get a token for its organization, with a FAIL line
    naming the route and the organization asked for."""
    standin.sub_organization_field = None  # the eu route gets a root token: refused
    code, out, err = await run("check", "--config", str(write_config(routes=TWO_ROUTES)))
    assert code == 1
    assert re.search(r"FAIL /eu +route 'eu'.*asked for a token for organization " + SUB_ORG, out)
    assert "1 route(s) cannot get a session token" in err


async def test_token_prints_a_session_token_the_api_accepts(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`token --route` prints a session token for that route's organization that the API accepts;
    without --route or with an unknown route it exits 2."""
    config = str(write_config(routes=TWO_ROUTES))
    code, out, err = await run("token", "--config", config, "--route", "eu")
    assert code == 0, err
    token = out.strip()
    assert (
        jwt.decode(token, options={"verify_signature": False})["currentOrganizationId"] == SUB_ORG
    )
    async with aiohttp.ClientSession() as http:
        reply = await request(
            http,
            "GET",
            f"{standin.api_url}/build/v2/profiles",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert reply.status == 200
    code, _, err = await run("token", "--config", config)
    assert code == 2 and "--route" in err
    code, _, err = await run("token", "--config", config, "--route", "nope")
    assert code == 2 and "no route named 'nope'" in err


async def test_serve_prints_where_it_listens_forwards_and_stops_on_sigterm(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """`serve` prints its listen address and routes, forwards to the right organization, and
    exits 0 on SIGTERM with no traceback, key or token in its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--config",
        str(write_config(routes=TWO_ROUTES)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    banner = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", banner)
    assert match, banner
    proxy = match.group(1)
    routes = (await process.stdout.readline() + await process.stdout.readline()).decode()
    assert "routes:" in routes
    async with aiohttp.ClientSession() as http:
        reply = await request(http, "GET", f"{proxy}/eu/x")
        assert reply.status == 200
        assert reply.json()["organization"] == SUB_ORG
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 20) == 0
    rest = (await process.stdout.read()).decode() + (await process.stderr.read()).decode()
    assert "Traceback" not in rest
    assert PERSONAL_KEY not in banner + routes + rest
    for token in standin.issued_tokens:
        assert token not in rest


async def test_zero_config_serves_from_appcircle_variables(
    standin: StandIn, unused_tcp_port: int
) -> None:
    """With no config file, APPCIRCLE_PERSONAL_ACCESS_KEY and APPCIRCLE_SUB_ORGANIZATION are
    enough to serve that sub-organization on --listen, and SIGINT exits 0."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("APPCIRCLE_", "TEST_"))
    }
    env |= {
        "APPCIRCLE_PERSONAL_ACCESS_KEY": PERSONAL_KEY,
        "APPCIRCLE_SUB_ORGANIZATION": SUB_ORG,
        "APPCIRCLE_PROXY_APPCIRCLE__API_URL": standin.api_url,
        "APPCIRCLE_PROXY_APPCIRCLE__AUTH_URL": standin.auth_url,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "--listen",
        f"127.0.0.1:{unused_tcp_port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    banner = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
    assert f"http://127.0.0.1:{unused_tcp_port}" in banner
    try:
        async with aiohttp.ClientSession() as http:
            reply = await request(
                http, "GET", f"http://127.0.0.1:{unused_tcp_port}/build/v2/profiles"
            )
            assert reply.status == 200
            assert reply.json()["organization"] == SUB_ORG
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 20) == 0


async def test_config_prints_the_effective_configuration_with_secrets_masked(
    write_config: WriteConfig,
) -> None:
    """`config` prints the effective configuration as JSON with flags applied over the file and
    every secret (key, client token) masked."""
    config = write_config(credentials=INLINE_KEY_CONFIG, server={"client_token": CLIENT_TOKEN})
    code, out, err = await run("config", "--config", str(config), "--listen", "127.0.0.1:9999")
    assert code == 0, err
    effective = json.loads(out)
    assert effective["server"]["listen"] == "127.0.0.1:9999"  # the flag won
    assert effective["server"]["client_token"] == "**********"
    assert effective["credentials"]["main"]["secret"] == "**********"
    assert PERSONAL_KEY not in out + err and CLIENT_TOKEN not in out + err


async def test_tokens_are_never_written_to_disk(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """`token` writes no file anywhere under HOME, TMPDIR or XDG_CACHE_HOME, and the token
    appears in no file: session tokens live in memory only."""
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(routes=TWO_ROUTES)
    before = {path for path in tmp_path.rglob("*")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "token",
        "--config",
        str(config),
        "--route",
        "eu",
        stdout=asyncio.subprocess.PIPE,
        cwd=home,
        env=os.environ | {"HOME": str(home), "TMPDIR": str(home), "XDG_CACHE_HOME": str(home)},
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    token = out.strip()
    assert token.startswith(b"ey")
    written = {path for path in tmp_path.rglob("*")} - before
    assert written == set()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token not in path.read_bytes()


async def test_demo_serves_its_three_curl_commands_with_no_account(unused_tcp_port: int) -> None:
    """`demo` runs without an account and each of the three curl commands it prints gets 200,
    with the sub-organization route answering for another organization."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--listen",
        f"127.0.0.1:{unused_tcp_port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        text = ""
        while "Ctrl-C" not in text:
            text += (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        urls = re.findall(r"^  curl '?(http://\S+?)'?$", text, re.MULTILINE)
        assert len(urls) == 3, text
        organizations = []
        async with aiohttp.ClientSession() as http:
            for url in urls:
                reply = await request(http, "GET", url)
                assert reply.status == 200
                organizations.append(reply.json()["organization"])
        assert len(set(organizations)) == 2  # the sub-organization route differs
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 20) == 0


async def test_an_aiohttp_without_the_private_attributes_read_stops_start_up_in_one_line(
    write_config: WriteConfig,
) -> None:
    """serve/aiohttp_private checks, at import, every aiohttp private attribute the head bound
    reads; an aiohttp that lost one (simulated here) stops `serve` with one clear line."""
    config = write_config()
    script = (
        "import sys; from aiohttp import web_protocol as p; del p.RequestHandler._payload_parser; "
        "from proxy.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    lines = err.decode().strip().splitlines()
    assert process.returncode == 2, err
    assert len(lines) == 1 and "Traceback" not in err.decode()
    assert "aiohttp" in lines[0] and "_payload_parser" in lines[0] and "<3.15" in lines[0]


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
