"""The command line as a user runs it: real processes, real signals, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import jwt

from proxy import __version__
from tests.standin import StandIn

from .conftest import (
    CLIENT_TOKEN,
    INLINE_KEY_CONFIG,
    PERSONAL_KEY,
    ROOT_ORG,
    SUB_ORG,
    WriteConfig,
)
from .support import request

TWO_ROUTES = {
    "root": {"prefix": "/", "credential": "main"},
    "eu": {"prefix": "/eu", "credential": "main", "sub_organization": SUB_ORG},
}


async def run(*args: str, timeout: float = 20) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ.copy(),
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


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
