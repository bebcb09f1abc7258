"""Gaps the guard closes and failures that must end in a clean answer: TRACE and TRACK,
Host values that only look like loopback, dot segments in disguise, undecodable header
bytes, malformed or redirected WebSocket handshakes, and config files or secrets that are
not UTF-8."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy.cli.main import main
from tests.standin import StandIn

from .conftest import CLIENT_TOKEN, PERSONAL_KEY, StartProxy, WriteConfig
from .rawhttp import exchange, status_of
from .support import request


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


async def raw_get(proxy: str, head: bytes) -> bytes:
    """GET / with the given header lines (CRLF-terminated), answered within half a second."""
    return await exchange(proxy, b"GET /x HTTP/1.1\r\n" + head + b"\r\n", read_for=0.5)


# -- methods --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
async def test_trace_and_track_get_405_and_never_reach_the_api(
    method: str, start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """TRACE is refused 405 method_not_allowed (TRACK 400 or 405) before any token exchange, so a
    request's headers, credentials among them, are never echoed back by the API."""
    proxy = await start_proxy()
    reply = await request(http, method, f"{proxy}/build/v2/profiles")
    if method == "TRACK":  # llhttp does not know TRACK: its parser refuses it first
        assert reply.status in (400, 405)
    else:
        assert (reply.status, reply.json()["error"]) == (405, "method_not_allowed")
    assert standin.api_requests == [] and standin.exchanges == []


# -- Host -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        b"[::1].evil.com",
        b"localhost:x@evil.com",
        b"localhost@evil.com",
        b"localhost:8787:8787",
        b"[::1",
        b"[::1]x:8787",
        b"[::1]@evil.com",
        b"[localhost]",
        b"localhost:",
        b"localhost/evil.com",
        b"127.0.0.1 evil.com",
    ],
)
async def test_host_values_that_only_look_like_loopback_get_403(
    host: bytes, start_proxy: StartProxy, standin: StandIn
) -> None:
    """Host values that merely start with or contain a loopback name (userinfo, extra port, bracket
    tricks, spaces, paths) are refused 400 or 403 and never forwarded: DNS rebinding stays shut."""
    proxy = await start_proxy()
    answer = await raw_get(proxy, b"Host: " + host + b"\r\n")
    assert status_of(answer) in (400, 403), answer
    assert standin.api_requests == []


@pytest.mark.parametrize("host", [b"[::1]", b"[0:0::1]:8787", b"LocalHost:1", b"127.0.0.1:80"])
async def test_loopback_in_any_spelling_is_accepted(
    host: bytes, start_proxy: StartProxy, standin: StandIn
) -> None:
    """A loopback Host in any valid spelling ([::1], a longer IPv6 form, mixed case, 127.0.0.1 with
    a port) is accepted with 200, so the guard refuses no legitimate local client."""
    proxy = await start_proxy()
    answer = await raw_get(proxy, b"Host: " + host + b"\r\nConnection: close\r\n")
    assert status_of(answer) == 200, answer


# -- paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/..;/x",
        "/eu/..;jsessionid=1/x",
        "/eu/.;/x",
        "/eu/%2e%2e;/x",
        "/eu/..%3b/x",
        "/eu/%252e%252e/x",
        "/eu/%25252e%25252e/x",
        "/eu/%252F",
        "/eu/a%25b",
    ],
)
async def test_dot_segments_with_parameters_and_double_encoding_are_refused(
    path: str, start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Dot segments disguised with ';' parameters or percent-encoding (single, double, triple), and
    an encoded '%' or '/' in the path, are refused 400 bad_path before reaching the API."""
    proxy = await start_proxy()
    reply = await request(http, "GET", URL(proxy + path, encoded=True))
    assert (reply.status, reply.json()["error"]) == (400, "bad_path"), path
    assert standin.api_requests == []


async def test_parameters_on_ordinary_segments_and_percent_in_the_query_pass(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """';' parameters on ordinary segments and an encoded '%' in the query are not mistaken for
    traversal: they pass with 200."""
    proxy = await start_proxy()
    for path in ("/eu/a;b/x", "/eu/..a;/x", "/x?q=%25"):
        reply = await request(http, "GET", URL(proxy + path, encoded=True))
        assert reply.status == 200, (path, reply.body)


# -- undecodable header bytes ---------------------------------------------------------


async def test_non_utf8_proxy_authorization_gets_400_and_no_traceback(
    start_proxy: StartProxy, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """A Proxy-Authorization header with non-UTF-8 bytes is refused 400 header_not_utf8, with no
    traceback logged and nothing forwarded."""
    proxy = await start_proxy(server={"client_token": CLIENT_TOKEN})
    answer = await raw_get(
        proxy, b"Host: localhost\r\nProxy-Authorization: Bearer \xff\xfe" + b"\r\n"
    )
    assert status_of(answer) == 400 and b"header_not_utf8" in answer
    assert standin.api_requests == []
    no_tracebacks(caplog)


async def test_non_utf8_header_value_is_refused_before_anything_is_forwarded(
    start_proxy: StartProxy, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """Any header value that is not UTF-8 is refused 400 header_not_utf8 before a token exchange or
    API request, while the same value in valid UTF-8 passes with 200."""
    proxy = await start_proxy()
    answer = await raw_get(proxy, b"Host: localhost\r\nX-Name: caf\xe9\r\n")
    assert status_of(answer) == 400 and b"header_not_utf8" in answer
    assert standin.api_requests == [] and standin.exchanges == []
    no_tracebacks(caplog)
    answer = await raw_get(proxy, "Host: localhost\r\nX-Name: café\r\n".encode())
    assert status_of(answer) == 200  # UTF-8 itself is fine


# -- WebSocket handshakes -------------------------------------------------------------

KEY = base64.b64encode(b"0123456789abcdef")


@pytest.mark.parametrize(
    "handshake",
    [
        b"Sec-WebSocket-Version: 13\r\n",
        b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: " + KEY + b"\r\n",
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n",
    ],
    ids=["no-key", "bad-version", "bad-key"],
)
async def test_malformed_websocket_upgrade_is_400_before_anything_opens_upstream(
    handshake: bytes,
    start_proxy: StartProxy,
    standin: StandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A WebSocket upgrade with no key, a version other than 13 or a malformed key is refused 400
    bad_websocket_upgrade before any token exchange or upstream connection, with no traceback."""
    proxy = await start_proxy()
    answer = await raw_get(
        proxy, b"Host: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + handshake
    )
    assert status_of(answer) == 400 and b"bad_websocket_upgrade" in answer
    assert standin.api_requests == [] and standin.exchanges == []
    no_tracebacks(caplog)


async def test_websocket_handshake_never_follows_a_redirect(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A redirect answered to a WebSocket handshake is not followed: the client gets 502 and the API
    sees only the first request."""
    proxy = await start_proxy()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"{proxy}/_test/redirect", params={"to": "/_test/ws"})
    assert refused.value.status == 502
    assert [seen.raw_path for seen in standin.api_requests] == ["/_test/redirect?to=/_test/ws"]


# -- config files and secrets that are not UTF-8 ----------------------------------------


def run_config_command(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["config", "--config", str(path)])
    return code, capsys.readouterr().err


def test_a_config_file_that_is_not_utf8_exits_2_with_one_line(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config file that is not UTF-8 makes `config` exit 2 with one line saying so, not a
    traceback."""
    path = write_config()
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    code, err = run_config_command(path, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "is not UTF-8" in err and "Traceback" not in err


def test_a_secret_file_that_is_not_utf8_exits_2_without_the_secret(
    write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret_file that is not UTF-8 makes `config` exit 2 naming the file, without printing the
    secret or a traceback."""
    secret = tmp_path / "key"
    secret.write_bytes(PERSONAL_KEY.encode() + b"\xff")
    path = write_config(
        credentials={"main": {"kind": "personal-access-key", "secret_file": str(secret)}}
    )
    code, err = run_config_command(path, capsys)
    assert code == 2
    assert "is not UTF-8" in err and str(secret) in err
    assert PERSONAL_KEY not in err and "Traceback" not in err


@pytest.mark.parametrize("setting", ["secret_env", "client_token_env"])
def test_a_secret_in_the_environment_that_is_not_utf8_exits_2_without_the_secret(
    setting: str,
    write_config: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A secret_env or client_token_env variable that is not valid UTF-8 makes `config` exit 2
    naming the variable, without printing the secret, a traceback or any warning."""
    # What Python makes of the byte 0xff in an environment variable.
    monkeypatch.setenv("TEST_BAD_SECRET", PERSONAL_KEY + os.fsdecode(b"\xff"))
    if setting == "secret_env":
        path = write_config(
            credentials={"main": {"kind": "personal-access-key", "secret_env": "TEST_BAD_SECRET"}}
        )
    else:
        path = write_config(server={"client_token_env": "TEST_BAD_SECRET"})
    code, err = run_config_command(path, capsys)
    assert code == 2
    assert "TEST_BAD_SECRET" in err and "not valid UTF-8" in err
    assert PERSONAL_KEY not in err and "Traceback" not in err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
