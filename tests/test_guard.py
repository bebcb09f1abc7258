"""The inbound guard: Host allowlist, browsers, client token, no open proxy, path tricks,
smuggling, size limits, the Unix socket, and the warning for a wide-open listener."""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy.server import start
from proxy.settings import load_settings
from proxy.standin import StandIn

from .conftest import CLIENT_TOKEN, PERSONAL_KEY_CONFIG, StartProxy
from .rawhttp import exchange, status_of


async def status(
    http: aiohttp.ClientSession, url: str | URL, **kwargs: object
) -> tuple[int, dict[str, object]]:
    async with http.get(url, **kwargs) as response:  # type: ignore[arg-type]
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body


# -- Host allowlist ---------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost:8787", "127.0.0.1", "[::1]:1", "LOCALHOST"])
async def test_loopback_host_names_are_accepted(
    host: str, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    assert (await status(http, f"{proxy}/x", headers={"Host": host}))[0] == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8787", "127.0.0.2", ""])
async def test_other_host_names_get_403_naming_the_setting(
    host: str, start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    code, body = await status(http, f"{proxy}/x", headers={"Host": host})
    assert code == 403
    assert body["error"] == "host_not_allowed"
    assert "server.allowed_hosts" in str(body["detail"])
    assert standin.api_requests == [] and standin.exchanges == []


async def test_allowed_hosts_adds_a_sidecar_name(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(PERSONAL_KEY_CONFIG, server='allowed_hosts = ["appcircle-proxy"]')
    assert (await status(http, f"{proxy}/x", headers={"Host": "appcircle-proxy:8787"}))[0] == 200
    assert (await status(http, f"{proxy}/x", headers={"Host": "other:8787"}))[0] == 403


# -- browsers ---------------------------------------------------------------------------


async def test_web_pages_are_refused_and_get_no_cors_headers(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    async with http.get(f"{proxy}/x", headers={"Origin": "https://evil.example"}) as response:
        assert response.status == 403
        assert (await response.json())["error"] == "origin_not_allowed"
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    # A page's no-cors request (an <img>, a form) carries no Origin but fetch metadata.
    code, _ = await status(http, f"{proxy}/x", headers={"Sec-Fetch-Site": "cross-site"})
    assert code == 403
    async with http.options(
        f"{proxy}/x",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"},
    ) as response:
        assert response.status == 403
    assert standin.api_requests == []


async def test_allowed_origin_gets_cors_and_its_preflight_is_answered_locally(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    origin = "http://localhost:3000"
    proxy = await start_proxy(PERSONAL_KEY_CONFIG, server=f'allowed_origins = ["{origin}"]')
    async with http.options(
        f"{proxy}/build/v2/profiles",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    ) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert response.headers["Access-Control-Allow-Methods"] == "POST"
        assert response.headers["Access-Control-Allow-Headers"] == "content-type"
    assert standin.api_requests == []
    async with http.get(f"{proxy}/x", headers={"Origin": origin}) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == origin
    async with http.get(f"{proxy}/x") as response:
        assert "Access-Control-Allow-Origin" not in response.headers


# -- client token -----------------------------------------------------------------------


async def test_client_token_is_required_compared_and_never_forwarded(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(PERSONAL_KEY_CONFIG, server=f'client_token = "{CLIENT_TOKEN}"')
    async with http.get(f"{proxy}/x") as response:
        assert response.status == 407
        assert response.headers["Proxy-Authenticate"].startswith("Bearer")
        body = await response.text()
    assert CLIENT_TOKEN not in body
    for wrong in ("Bearer nope", f"Basic {CLIENT_TOKEN}", f"Bearer {CLIENT_TOKEN}x", ""):
        code, _ = await status(http, f"{proxy}/x", headers={"Proxy-Authorization": wrong})
        assert code == 407, wrong
    async with http.get(
        f"{proxy}/x", headers={"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}"}
    ) as response:
        assert response.status == 200
        echoed = json.dumps(await response.json())
    assert CLIENT_TOKEN not in echoed
    assert "proxy-authorization" not in echoed.lower()


async def test_client_token_from_a_file(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token_file = tmp_path / "client-token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    proxy = await start_proxy(PERSONAL_KEY_CONFIG, server=f'client_token_file = "{token_file}"')
    assert (await status(http, f"{proxy}/x"))[0] == 407
    headers = {"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}"}
    assert (await status(http, f"{proxy}/x", headers=headers))[0] == 200


# -- never an open proxy ----------------------------------------------------------------


async def test_absolute_form_and_connect_are_refused(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    proxy = await start_proxy()
    answer = await exchange(
        proxy, b"GET http://other.example/x HTTP/1.1\r\nHost: other.example\r\n\r\n", read_for=0.5
    )
    assert status_of(answer) == 400 and b"absolute_form" in answer
    answer = await exchange(
        proxy, b"GET http://localhost/x HTTP/1.1\r\nHost: localhost\r\n\r\n", read_for=0.5
    )
    assert status_of(answer) == 400
    answer = await exchange(
        proxy,
        b"CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\n\r\n",
        read_for=0.5,
    )
    assert status_of(answer) == 405
    assert standin.api_requests == []


@pytest.mark.parametrize(
    "path",
    [
        "/eu/../x",
        "/eu/%2e%2E/x",
        "/eu/.%2e/x",
        "/eu/./x",
        "/eu%2Fx",
        "/eu%2fx",
        "//evil.example/x",
        "/eu//x",
        "/eu/%5C..%5Cx",
        "/eu/a%00b",
    ],
)
async def test_path_tricks_are_refused(
    path: str, start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    code, body = await status(http, URL(proxy + path, encoded=True))
    assert (code, body["error"]) == (400, "bad_path"), path
    assert standin.api_requests == []


async def test_backslash_and_raw_nul_are_refused(start_proxy: StartProxy) -> None:
    proxy = await start_proxy()
    for target in (b"/eu\\..\\x", b"/eu/a\x00b"):
        answer = await exchange(
            proxy, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", read_for=0.5
        )
        assert status_of(answer) == 400, target


async def test_dots_inside_names_and_encoded_characters_elsewhere_are_fine(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    for path in ("/build/v2/app.v1.2/..x", "/a%20b/c", "/x/?q=../..%2F", "/trailing/"):
        code, body = await status(http, URL(proxy + path, encoded=True))
        assert code == 200, (path, body)


# -- smuggling and limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5, 6\r\n",
        b"Transfer-Encoding: chunked, identity\r\n",
    ],
)
async def test_ambiguous_body_framing_is_refused(
    head: bytes, start_proxy: StartProxy, standin: StandIn
) -> None:
    proxy = await start_proxy()
    answer = await exchange(
        proxy, b"POST /x HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\nhello!", read_for=0.5
    )
    assert status_of(answer) == 400
    assert standin.api_requests == []


async def test_long_url_gets_414_and_many_or_big_headers_get_431(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        PERSONAL_KEY_CONFIG,
        server="max_url_length = 1000\nmax_header_bytes = 4096\nmax_header_count = 20",
    )
    assert (await status(http, f"{proxy}/{'a' * 1000}"))[0] == 414
    many = {f"X-H{i}": "v" for i in range(25)}
    assert (await status(http, f"{proxy}/x", headers=many))[0] == 431
    big = {f"X-H{i}": "v" * 1000 for i in range(5)}
    assert (await status(http, f"{proxy}/x", headers=big))[0] == 431
    # Far past the limits, the HTTP parser itself refuses, still cleanly.
    assert (await status(http, f"{proxy}/{'a' * 20000}"))[0] in (400, 414)
    assert (await status(http, f"{proxy}/x"))[0] == 200


# -- listeners --------------------------------------------------------------------------


async def test_unix_socket_listener_is_private_and_serves(
    standin: StandIn, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    socket_path = tmp_path / "proxy.sock"
    config = write_config(PERSONAL_KEY_CONFIG)
    config.write_text(
        config.read_text().replace('listen = "127.0.0.1:0"', f'listen = "unix:{socket_path}"')
    )
    proxy = await start(load_settings(config))
    try:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as http,
            http.get("http://localhost/build/v2/profiles") as response,
        ):
            assert response.status == 200
    finally:
        await proxy.stop()


async def test_listening_beyond_loopback_without_client_token_warns(
    standin: StandIn, write_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(PERSONAL_KEY_CONFIG)
    config.write_text(config.read_text().replace('"127.0.0.1:0"', '"0.0.0.0:0"'))
    proxy = await start(load_settings(config))
    await proxy.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("WITHOUT A CLIENT TOKEN" in message for message in warnings)
    caplog.clear()
    proxy = await start(load_settings(write_config(PERSONAL_KEY_CONFIG)))
    await proxy.stop()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
