"""The inbound guard: Host allowlist, browsers and CORS, the client token, no open
proxy, path tricks, malformed and hostile requests refused cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import ssl
import stat
import string
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from proxy.config.errors import ConfigError
from proxy.config.load import load_settings
from proxy.serve.server import Running, start
from tests.support.standin import StandIn

from .conftest import CLIENT_TOKEN, PERSONAL_KEY, SUB_ORG, StartProxy, WriteConfig
from .support import assert_no_tracebacks, listener_certificate, proxy_config, request
from .support.rawclient import exchange, json_of, status_of

TEAM_TOKEN = "team_" + "5f0c" * 8  # a second client's token, checked for leaks by hand


TWO_ROUTES: dict[str, Any] = {
    "apps": {"prefix": "/", "credential": "main"},
    "eu": {"prefix": "/eu", "credential": "main", "sub_organization": SUB_ORG},
}


def named_clients(tmp_path: Path) -> dict[str, Any]:
    """Two teams: 'mobile' (from a variable, every route) and 'web' (from a file, /eu only)."""
    token_file = tmp_path / "web-token"
    token_file.write_text(TEAM_TOKEN + "\n")
    return {
        "mobile": {"token_env": "TEST_MOBILE_TOKEN"},
        "web": {"token_file": str(token_file), "routes": ["eu"]},
    }


async def raw_get(proxy: str, head: bytes) -> bytes:
    """GET / with the given header lines (CRLF-terminated), answered within half a second."""
    return await exchange(proxy, b"GET /x HTTP/1.1\r\n" + head + b"\r\n", read_for=0.5)


async def still_serving(proxy: str) -> None:
    async with aiohttp.ClientSession() as http:
        assert (await request(http, "GET", f"{proxy}/still/up")).status == 200


@pytest.fixture(scope="module")
def threaded_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The stand-in and the proxy on their own loop in a thread, for synchronous probing."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    key = "pak_" + secrets.token_hex(8)
    standin = StandIn()
    config = tmp_path_factory.mktemp("hypothesis") / "proxy.toml"

    async def up() -> str:
        standin.add_personal_key(key, "11111111-1111-4111-8111-111111111111")
        await standin.start()
        credentials = {"main": {"kind": "personal-access-key", "secret": key}}
        document = proxy_config(standin.api_url, standin.auth_url, credentials=credentials)
        config.write_text(tomli_w.dumps(document))
        proxy = await start(load_settings(Path(config)))
        proxies.append(proxy)
        return proxy.urls[0]

    proxies: list[Running] = []
    url = asyncio.run_coroutine_threadsafe(up(), loop).result(10)
    yield url

    async def down() -> None:
        for proxy in proxies:
            await proxy.stop()
        await standin.close()

    asyncio.run_coroutine_threadsafe(down(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def send(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(data)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"


PATH_CHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%\\"


methods = st.text(TOKEN, min_size=1, max_size=10)


paths = st.text(PATH_CHARS, max_size=60).map(lambda text: "/" + text)


queries = st.one_of(st.just(""), st.text(PATH_CHARS + "?", max_size=40).map(lambda q: "?" + q))


header_names = st.text(TOKEN, min_size=1, max_size=20)


header_values = st.text(string.printable.strip(), max_size=40)


headers = st.lists(st.tuples(header_names, header_values), max_size=8)


@pytest.mark.parametrize("host", ["localhost:8787", "127.0.0.1", "[::1]:1", "LOCALHOST"])
async def test_loopback_host_names_are_accepted(
    host: str, start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A Host of localhost, 127.0.0.1 or [::1], with or without a port and in any case, is
    accepted."""
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x", headers={"Host": host})).status == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8787", "127.0.0.2", ""])
async def test_other_host_names_get_403_naming_the_setting(
    host: str, start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Any other Host (a foreign name, 127.0.0.2, empty) gets 403 host_not_allowed naming
    server.allowed_hosts, before any exchange: DNS rebinding cannot reach the API."""
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/x", headers={"Host": host})
    assert reply.status == 403
    assert reply.json()["error"] == "host_not_allowed"
    assert "server.allowed_hosts" in reply.json()["detail"]
    assert standin.api_requests == [] and standin.exchanges == []


async def test_allowed_hosts_adds_a_sidecar_name(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A name in server.allowed_hosts (a sidecar's service name) is accepted with any port, while
    other names still get 403."""
    proxy = await start_proxy(server={"allowed_hosts": ["appcircle-proxy"]})
    sidecar = await request(http, "GET", f"{proxy}/x", headers={"Host": "appcircle-proxy:8787"})
    assert sidecar.status == 200
    other = await request(http, "GET", f"{proxy}/x", headers={"Host": "other:8787"})
    assert other.status == 403


async def test_web_pages_are_refused_and_get_no_cors_headers(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A request from a web page (an Origin, or Sec-Fetch-Site: cross-site) or its preflight gets
    403 origin_not_allowed naming server.allowed_origins, with no Access-Control-* headers."""
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/x", headers={"Origin": "https://evil.example"})
    assert reply.status == 403
    assert reply.json()["error"] == "origin_not_allowed"
    assert "server.allowed_origins" in reply.json()["detail"]
    assert not [h for h in reply.headers if h.lower().startswith("access-control-")]
    # A page's no-cors request (an <img>, a form) carries no Origin but fetch metadata.
    reply = await request(http, "GET", f"{proxy}/x", headers={"Sec-Fetch-Site": "cross-site"})
    assert reply.status == 403
    reply = await request(
        http,
        "OPTIONS",
        f"{proxy}/x",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"},
    )
    assert reply.status == 403
    assert standin.api_requests == []


async def test_allowed_origin_gets_cors_and_its_preflight_is_answered_locally(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """An origin in server.allowed_origins gets its preflight answered 204 by the proxy, its
    requests get Access-Control-Allow-Origin and one Vary: Origin, matching without trailing
    slash or case."""
    origin = "http://localhost:3000"
    proxy = await start_proxy(server={"allowed_origins": [origin]})
    reply = await request(
        http,
        "OPTIONS",
        f"{proxy}/build/v2/profiles",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert reply.status == 204
    assert reply.headers["Access-Control-Allow-Origin"] == origin
    assert reply.headers["Access-Control-Allow-Methods"] == "POST"
    assert reply.headers["Access-Control-Allow-Headers"] == "content-type"
    assert standin.api_requests == []
    reply = await request(http, "GET", f"{proxy}/x", headers={"Origin": origin})
    assert reply.status == 200
    assert reply.headers["Access-Control-Allow-Origin"] == origin
    # Caches must key the answer on the Origin.
    varies = ",".join(reply.headers.getall("Vary")).split(",")
    # Once: every answer is decorated exactly once, before it is sent.
    assert [name.strip().lower() for name in varies].count("origin") == 1
    reply = await request(http, "GET", f"{proxy}/x")
    assert "Access-Control-Allow-Origin" not in reply.headers
    # Origins compare without a trailing slash and in any case.
    for spelling in (f"{origin}/", origin.upper()):
        reply = await request(http, "GET", f"{proxy}/x", headers={"Origin": spelling})
        assert reply.status == 200, spelling
        assert reply.headers["Access-Control-Allow-Origin"] == spelling


async def test_only_a_real_preflight_is_answered_locally(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Only an OPTIONS with both Origin and Access-Control-Request-Method is answered locally as
    a preflight; anything short of that is forwarded to the API."""
    origin = "http://localhost:3000"
    proxy = await start_proxy(server={"allowed_origins": [origin]})
    # A preflight is an OPTIONS with both Origin and Access-Control-Request-Method;
    # anything short of that is an ordinary request for the API.
    for method, headers in [
        ("OPTIONS", {"Origin": origin}),
        ("OPTIONS", {"Access-Control-Request-Method": "POST"}),
        ("GET", {"Origin": origin, "Access-Control-Request-Method": "POST"}),
    ]:
        reply = await request(http, method, f"{proxy}/x", headers=headers)
        assert reply.status == 200, (method, headers)
        assert reply.json()["method"] == method
    assert len(standin.api_requests) == 3


async def test_client_token_is_required_compared_and_never_forwarded(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """With server.client_token set, a missing or wrong Proxy-Authorization gets 407 with
    Proxy-Authenticate, the right Bearer token passes in any case and spacing, and never reaches
    the API."""
    proxy = await start_proxy(server={"client_token": CLIENT_TOKEN})
    reply = await request(http, "GET", f"{proxy}/x")
    assert reply.status == 407
    assert reply.json()["error"] == "proxy_authentication_required"
    assert "Proxy-Authorization: Bearer" in reply.json()["detail"]
    assert reply.headers["Proxy-Authenticate"].startswith("Bearer")
    assert CLIENT_TOKEN.encode() not in reply.body
    wrongs = ("Bearer nope", f"Basic {CLIENT_TOKEN}", f"Bearer {CLIENT_TOKEN}x", "")
    for number, wrong in enumerate(wrongs):  # by number: a failure must not print the token
        reply = await request(http, "GET", f"{proxy}/x", headers={"Proxy-Authorization": wrong})
        assert reply.status == 407, number
    # The scheme in any case, spaces around the token tolerated.
    for form, right in {
        "plain": f"Bearer {CLIENT_TOKEN}",
        "loose": f"bearer  {CLIENT_TOKEN} ",
    }.items():
        reply = await request(http, "GET", f"{proxy}/x", headers={"Proxy-Authorization": right})
        assert reply.status == 200, form
        echoed = json.dumps(reply.json())
        assert CLIENT_TOKEN not in echoed
    assert "proxy-authorization" not in echoed.lower()


async def test_client_token_from_a_file(
    start_proxy: StartProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """server.client_token_file is read (trailing newline stripped) and enforced like
    client_token."""
    token_file = tmp_path / "client-token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    proxy = await start_proxy(server={"client_token_file": str(token_file)})
    assert (await request(http, "GET", f"{proxy}/x")).status == 407
    headers = {"Proxy-Authorization": f"Bearer {CLIENT_TOKEN}"}
    assert (await request(http, "GET", f"{proxy}/x", headers=headers)).status == 200


async def test_absolute_form_and_connect_are_refused(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """An absolute-form target gets 400 absolute_form and CONNECT gets 405, so the proxy can
    never be used as an open proxy to other hosts."""
    proxy = await start_proxy()
    answer = await exchange(
        proxy, b"GET http://other.example/x HTTP/1.1\r\nHost: other.example\r\n\r\n", read_for=0.5
    )
    assert status_of(answer) == 400
    refusal = json_of(answer)
    assert refusal["error"] == "absolute_form" and "API base URL" in refusal["detail"]
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
    refusal = json_of(answer)
    assert refusal["error"] == "method_not_allowed" and "open proxy" in refusal["detail"]
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
        # Dots with whitespace or control characters around them, which servers trim.
        "/x/..%09/y",
        "/x/..%20/y",
        "/x/%20../y",
        "/x/.%0d/y",
        "/x/..%C2%85/y",
    ],
)
async def test_path_tricks_are_refused(
    path: str, start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Dot segments (plain or encoded), encoded slashes and backslashes, empty segments and NUL
    in the path get 400 bad_path and never reach the API, so no request escapes its route's
    prefix."""
    proxy = await start_proxy()
    reply = await request(http, "GET", URL(proxy + path, encoded=True))
    assert (reply.status, reply.json()["error"]) == (400, "bad_path"), path
    assert "not allowed" in reply.json()["detail"]
    assert standin.api_requests == []


async def test_backslash_and_raw_nul_are_refused(start_proxy: StartProxy) -> None:
    """A raw backslash or NUL byte in the request target gets 400."""
    proxy = await start_proxy()
    for target in (b"/eu\\..\\x", b"/eu/a\x00b"):
        answer = await exchange(
            proxy, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", read_for=0.5
        )
        assert status_of(answer) == 400, target


async def test_dots_inside_names_and_encoded_characters_elsewhere_are_fine(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Dots inside segment names, encoded spaces, dots and slashes in the query, and a trailing
    slash are not mistaken for path tricks."""
    proxy = await start_proxy()
    for path in ("/build/v2/app.v1.2/..x", "/a%20b/c", "/x/?q=../..%2F", "/trailing/"):
        reply = await request(http, "GET", URL(proxy + path, encoded=True))
        assert reply.status == 200, (path, reply.body)


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
    """Ambiguous body framing (Content-Length with Transfer-Encoding, two lengths, a length list,
    chunked not last) gets 400 and is never forwarded, so no request can be smuggled."""
    proxy = await start_proxy()
    answer = await exchange(
        proxy, b"POST /x HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\nhello!", read_for=0.5
    )
    assert status_of(answer) == 400
    assert standin.api_requests == []


async def test_long_url_gets_414_and_many_or_big_headers_get_431(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A URL past server.max_url_length gets 414 url_too_long, headers past max_header_count or
    max_header_bytes get 431 headers_too_large, each naming the limit, and service continues."""
    proxy = await start_proxy(
        server={"max_url_length": 1000, "max_header_bytes": 4096, "max_header_count": 20}
    )
    reply = await request(http, "GET", f"{proxy}/{'a' * 1000}")
    assert (reply.status, reply.json()["error"]) == (414, "url_too_long")
    assert "1000 bytes" in reply.json()["detail"]
    many = {f"X-H{i}": "v" for i in range(25)}
    reply = await request(http, "GET", f"{proxy}/x", headers=many)
    assert (reply.status, reply.json()["error"]) == (431, "headers_too_large")
    assert "20 headers or 4096 bytes" in reply.json()["detail"]
    big = {f"X-H{i}": "v" * 1000 for i in range(5)}
    assert (await request(http, "GET", f"{proxy}/x", headers=big)).status == 431
    # Far past the limits, the HTTP parser itself refuses, still cleanly.
    assert (await request(http, "GET", f"{proxy}/{'a' * 20000}")).status in (400, 414)
    assert (await request(http, "GET", f"{proxy}/x")).status == 200


async def test_the_size_limits_are_inclusive(start_proxy: StartProxy) -> None:
    """max_url_length, max_header_count and max_header_bytes are inclusive: a request exactly at
    each limit passes, one byte or header more is refused."""
    proxy = await start_proxy(
        server={"max_url_length": 256, "max_header_bytes": 1024, "max_header_count": 8}
    )

    async def status(target: bytes, *headers: bytes) -> int:
        head = b"GET " + target + b" HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in headers)
        return status_of(await exchange(proxy, head + b"\r\n", read_for=0.3))

    host = b"Host: localhost"  # counts 17 bytes: name, value, and 4 for ': ' and CRLF
    assert await status(b"/" + b"a" * 255, host) == 200
    assert await status(b"/" + b"a" * 256, host) == 414
    assert await status(b"/x", host, *[b"X-H%d: v" % i for i in range(7)]) == 200
    assert await status(b"/x", host, *[b"X-H%d: v" % i for i in range(8)]) == 431
    # 17 + (5 + 998 + 4) is exactly 1024.
    assert await status(b"/x", host, b"X-Pad: " + b"v" * 998) == 200
    assert await status(b"/x", host, b"X-Pad: " + b"v" * 999) == 431


async def test_a_request_without_a_host_header_is_refused_not_an_error(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """An HTTP/1.0 request without a Host header gets 403 host_not_allowed, not a server error."""
    proxy = await start_proxy()
    answer = await exchange(proxy, b"GET /x HTTP/1.0\r\n\r\n", read_for=0.5)
    assert status_of(answer) == 403
    assert json_of(answer)["error"] == "host_not_allowed"
    assert standin.api_requests == []


async def test_unix_socket_listener_is_private_and_serves(
    standin: StandIn, write_config: WriteConfig, tmp_path: Path
) -> None:
    """A unix: listen address creates a socket with mode 0600 that serves requests."""
    socket_path = tmp_path / "proxy.sock"
    proxy = await start(load_settings(write_config(server={"listen": f"unix:{socket_path}"})))
    try:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket_path))
        ) as http:
            reply = await request(http, "GET", "http://localhost/build/v2/profiles")
            assert reply.status == 200
    finally:
        await proxy.stop()


async def test_listening_beyond_loopback_without_client_token_warns(
    standin: StandIn, write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Listening on 0.0.0.0 without server.client_token logs a WITHOUT A CLIENT TOKEN warning;
    the default loopback listener logs no warning."""
    proxy = await start(load_settings(write_config(server={"listen": "0.0.0.0:0"})))
    await proxy.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("WITHOUT A CLIENT TOKEN" in message for message in warnings)
    caplog.clear()
    proxy = await start(load_settings(write_config()))
    await proxy.stop()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


async def test_an_encoded_health_path_is_not_exempt_from_the_client_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Routing reads the raw path, so the exemption does too: '/%5Fproxy/health' is not
    the health check (it would go to the API under the '/' route), and needs the token."""
    proxy = await start_proxy(server={"client_token": CLIENT_TOKEN})
    reply = await request(http, "GET", URL(f"{proxy}/%5Fproxy/health", encoded=True))
    assert reply.status == 407, reply.body
    assert standin.api_requests == []
    reply = await request(http, "GET", f"{proxy}/_proxy/health")
    assert reply.status == 200


async def test_named_clients_each_use_only_their_routes(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each client token names a client; a client limited to some routes gets 403 (naming
    itself and the route) on the others, before any token is taken for them."""
    monkeypatch.setenv("TEST_MOBILE_TOKEN", CLIENT_TOKEN)
    proxy = await start_proxy(routes=TWO_ROUTES, clients=named_clients(tmp_path))
    mobile = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    web = {"Proxy-Authorization": f"Bearer {TEAM_TOKEN}"}
    assert (await request(http, "GET", f"{proxy}/build/v2/profiles", headers=mobile)).status == 200
    assert (
        await request(http, "GET", f"{proxy}/eu/build/v2/profiles", headers=mobile)
    ).status == 200
    assert (await request(http, "GET", f"{proxy}/eu/build/v2/profiles", headers=web)).status == 200
    refused = await request(http, "GET", f"{proxy}/build/v2/profiles", headers=web)
    assert refused.status == 403
    assert refused.json()["error"] == "client_not_allowed"
    assert (refused.json()["client"], refused.json()["route"]) == ("web", "apps")
    assert TEAM_TOKEN.encode() not in refused.body


async def test_a_wrong_or_missing_token_gets_401_with_named_clients(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standin: StandIn,
) -> None:
    """Named clients guard the proxy as the single client token does: no token of theirs,
    no request upstream; server.client_token still works, as client "default"."""
    monkeypatch.setenv("TEST_MOBILE_TOKEN", "mobile_" + "a1" * 16)
    proxy = await start_proxy(
        routes=TWO_ROUTES, clients=named_clients(tmp_path), server={"client_token": CLIENT_TOKEN}
    )
    for number, wrong in enumerate(("Bearer nope", f"Bearer {TEAM_TOKEN}x", "Basic Og==")):
        reply = await request(http, "GET", f"{proxy}/x", headers={"Authorization": wrong})
        assert reply.status == 401, number
        assert reply.json()["error"] == "client_token_required"
    assert (await request(http, "GET", f"{proxy}/x")).status == 407
    assert standin.api_requests == []
    default = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    assert (await request(http, "GET", f"{proxy}/x", headers=default)).status == 200
    metrics = await request(http, "GET", f"{proxy}/_proxy/metrics", headers=default)
    assert 'client_requests_total{client="default",route="apps",status_class="2xx"} 1.0' in (
        metrics.body.decode()
    )


async def test_the_clients_name_is_in_the_access_log_and_a_metric_never_its_token(
    standin: StandIn,
    write_config: WriteConfig,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A shared proxy can tell which team did what: `client_name` in the access line, and
    `appcircle_proxy_client_requests_total{client=...}`; the tokens appear nowhere."""
    monkeypatch.setenv("TEST_MOBILE_TOKEN", CLIENT_TOKEN)
    config = write_config(
        routes=TWO_ROUTES, clients=named_clients(tmp_path), log={"format": "json"}
    )
    running = await start(load_settings(config))
    try:
        proxy = running.urls[0]
        web = {"Authorization": f"Bearer {TEAM_TOKEN}"}
        mobile = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
        assert (await request(http, "GET", f"{proxy}/eu/x", headers=web)).status == 200
        assert (await request(http, "GET", f"{proxy}/x", headers=web)).status == 403
        assert (await request(http, "GET", f"{proxy}/x", headers=mobile)).status == 200
        metrics = await request(http, "GET", f"{proxy}/_proxy/metrics", headers=mobile)
    finally:
        await running.stop()  # writes every access line
    samples = {
        (s.labels["client"], s.labels["route"], s.labels["status_class"]): s.value
        for family in text_string_to_metric_families(metrics.body.decode())
        if family.name == "appcircle_proxy_client_requests"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert samples == {
        ("web", "eu", "2xx"): 1,
        ("web", "apps", "4xx"): 1,
        ("mobile", "apps", "2xx"): 1,
    }
    written = capsys.readouterr()
    lines = [
        json.loads(line) for line in written.err.splitlines() if "appcircle_proxy.access" in line
    ]
    assert [(line["path"], line["client_name"]) for line in lines] == [
        ("/eu/x", "web"),
        ("/x", "web"),
        ("/x", "mobile"),
        ("/_proxy/metrics", "mobile"),
    ]
    for output in (written.out, written.err, metrics.body.decode(), caplog.text):
        assert TEAM_TOKEN not in output and CLIENT_TOKEN not in output


@pytest.mark.parametrize(
    ("clients", "server", "complaint"),
    [
        (
            {"a": {"token_env": "TEST_MOBILE_TOKEN"}, "b": {"token_env": "TEST_MOBILE_TOKEN"}},
            {},
            "same token",
        ),
        (
            {"default": {"token_env": "TEST_MOBILE_TOKEN"}},
            {"client_token": CLIENT_TOKEN},
            "that token's name",
        ),
        (
            {"a": {"token_env": "TEST_MOBILE_TOKEN", "routes": ["nope"]}},
            {},
            "'nope', which is not a route",
        ),
        ({"a": {}}, {}, "exactly one of token_env"),
        ({"a b": {"token_env": "TEST_MOBILE_TOKEN"}}, {}, "letters, digits"),
        ({"a": {"token_env": "TEST_UNSET_TOKEN"}}, {}, "TEST_UNSET_TOKEN (token_env) is not set"),
    ],
)
def test_named_clients_are_checked_at_start_up(
    write_config: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
    clients: dict[str, Any],
    server: dict[str, Any],
    complaint: str,
) -> None:
    """A client configuration the proxy could not enforce stops it with one line."""
    monkeypatch.setenv("TEST_MOBILE_TOKEN", CLIENT_TOKEN)
    with pytest.raises(ConfigError) as refused:
        load_settings(write_config(clients=clients, server=server))
    assert complaint in str(refused.value)
    assert CLIENT_TOKEN not in str(refused.value)


async def test_the_listener_serves_https_with_its_certificate(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    """With server.tls_*, the proxy speaks HTTPS (its URL says so) with that certificate,
    and a plain-HTTP request gets no answer from the API."""
    ca = trustme.CA()
    proxy = await start_proxy(server=listener_certificate(ca, tmp_path, "first"))
    assert proxy.startswith("https://127.0.0.1:")
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    connector = aiohttp.TCPConnector(ssl=trusted)
    async with aiohttp.ClientSession(connector=connector) as https:
        assert (await request(https, "GET", f"{proxy}/build/v2/profiles")).status == 200
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            await request(plain, "GET", proxy.replace("https:", "http:") + "/x")


def test_tls_needs_both_files_and_usable_ones(write_config: WriteConfig, tmp_path: Path) -> None:
    """Half a TLS configuration, or files that are not a matching PEM pair, stop the start
    with one line naming the files (never their content)."""
    ca = trustme.CA()
    files = listener_certificate(ca, tmp_path, "first")
    with pytest.raises(ConfigError, match="tls_cert_file is set but tls_key_file is not"):
        load_settings(write_config(server={"tls_cert_file": files["tls_cert_file"]}))
    other = tmp_path / "other.key"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    for key in (str(other), str(tmp_path / "missing.key")):
        with pytest.raises(ConfigError, match="cannot be used") as refused:
            load_settings(write_config(server={**files, "tls_key_file": key}))
        assert key in str(refused.value) and "PRIVATE KEY" not in str(refused.value)


async def test_a_key_exchange_with_named_clients_needs_a_clients_token_and_stands_for_it(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standin: StandIn,
) -> None:
    """With only named clients (no server.client_token), the local key exchange still needs
    a client's token as its key (anything else: 401, so no local token opens the proxy
    without one); a client exchanges only under its own routes, and its local token then
    acts as that client: its routes, its name in the access log."""
    monkeypatch.setenv("TEST_MOBILE_TOKEN", CLIENT_TOKEN)
    proxy = await start_proxy(routes=TWO_ROUTES, clients=named_clients(tmp_path))
    endpoint = "/auth/v3/token"
    for key in ("anything", PERSONAL_KEY):
        refused = await request(http, "POST", proxy + endpoint, data={"personalAccessKey": key})
        assert refused.status == 401 and refused.json()["error"] == "exchange_key_rejected"
    # 'web' may use /eu only: no exchange under / for it.
    outside = await request(http, "POST", proxy + endpoint, data={"personalAccessKey": TEAM_TOKEN})
    assert outside.status == 403 and outside.json()["error"] == "client_not_allowed"
    answer = await request(
        http, "POST", f"{proxy}/eu{endpoint}", data={"personalAccessKey": TEAM_TOKEN}
    )
    assert answer.status == 200
    local = {"Authorization": f"Bearer {answer.json()['access_token']}"}
    assert (
        await request(http, "GET", f"{proxy}/eu/build/v2/profiles", headers=local)
    ).status == 200
    assert standin.exchanges and all(e.status == 200 for e in standin.exchanges)


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
    assert_no_tracebacks(caplog)


async def test_non_utf8_header_value_is_refused_before_anything_is_forwarded(
    start_proxy: StartProxy, standin: StandIn, caplog: pytest.LogCaptureFixture
) -> None:
    """Any header value that is not UTF-8 is refused 400 header_not_utf8 before a token exchange or
    API request, while the same value in valid UTF-8 passes with 200."""
    proxy = await start_proxy()
    answer = await raw_get(proxy, b"Host: localhost\r\nX-Name: caf\xe9\r\n")
    assert status_of(answer) == 400 and b"header_not_utf8" in answer
    assert standin.api_requests == [] and standin.exchanges == []
    assert_no_tracebacks(caplog)
    answer = await raw_get(proxy, "Host: localhost\r\nX-Name: café\r\n".encode())
    assert status_of(answer) == 200  # UTF-8 itself is fine


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n",
        b"G\x00ET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Bad\x01Name: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: localhost\r\n no-name-continuation\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
    ],
    ids=[
        "garbage",
        "no-target",
        "bad-version",
        "nul-in-method",
        "bad-header-name",
        "nul-in-value",
        "obsolete-folding",
        "tls-hello",
    ],
)
async def test_malformed_requests_get_400_and_no_traceback(
    request_bytes: bytes,
    start_proxy: StartProxy,
    standin: StandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Malformed requests (garbage, a bad version, NUL or control bytes, obsolete line folding, a
    TLS hello) get a 400 or a closed connection, nothing is forwarded, and no traceback is logged.
    """
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy()
    answer = await exchange(proxy, request_bytes, read_for=0.5)
    assert answer == b"" or status_of(answer) == 400
    assert standin.api_requests == []
    await still_serving(proxy)
    assert_no_tracebacks(caplog)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, path=paths, query=queries, extra=headers)
def test_any_request_is_forwarded_faithfully_or_refused_cleanly(
    threaded_proxy: str, method: str, path: str, query: str, extra: list[tuple[str, str]]
) -> None:
    """Property test: any generated method, path, query and headers are either forwarded with method
    and raw path unchanged or refused with a 4xx (with a JSON error), and the proxy keeps serving.
    """
    lines = [f"{method} {path}{query} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [
        f"{name}: {value}"
        for name, value in extra
        if name.lower()
        not in (
            "host",
            "connection",
            "content-length",
            "transfer-encoding",
            "origin",
            "sec-fetch-site",
            "upgrade",
        )
    ]
    answer = send(threaded_proxy, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head, _, body = answer.partition(b"\r\n\r\n")
    status = status_of(head)
    if status == 200 and method != "HEAD" and not path.startswith("/_test"):
        echoed = json.loads(body)
        assert echoed["method"] == method
        # The one byte not kept: a bare '?' (an empty query), which yarl drops.
        assert echoed["raw_path"] == path + (query if query != "?" else "")
    elif status != 200:
        assert 400 <= status < 500, answer[:300]
        if b"application/json" in head:
            assert "error" in json.loads(body)
    assert (
        status_of(
            send(
                threaded_proxy, b"GET /up HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
        )
        == 200
    )


async def test_a_same_site_page_request_without_origin_is_refused(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A request with Sec-Fetch-Site: same-site and no Origin is refused 403 origin_not_allowed
    before reaching the API, while Sec-Fetch-Site: none (the user's own navigation) passes."""
    proxy = await start_proxy()
    # A page on another port or subdomain of the same site: fetch metadata, no Origin.
    reply = await request(http, "GET", f"{proxy}/x", headers={"Sec-Fetch-Site": "same-site"})
    assert reply.status == 403
    assert reply.json()["error"] == "origin_not_allowed"
    assert standin.api_requests == []
    # The user's own navigation (typing the URL) is not a page's doing.
    reply = await request(http, "GET", f"{proxy}/x", headers={"Sec-Fetch-Site": "none"})
    assert reply.status == 200


async def test_the_apis_own_cors_headers_never_reach_the_client(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The API's own Access-Control-* headers are dropped; an allowed Origin gets only the proxy's
    Access-Control-Allow-Origin for that origin, never the API's wildcard."""
    origin = "http://localhost:3000"
    proxy = await start_proxy(server={"allowed_origins": [origin]})

    def cors_of(headers: CIMultiDictProxy[str]) -> dict[str, str]:
        return {
            name: value
            for name, value in headers.items()
            if name.lower().startswith("access-control-")
        }

    reply = await request(http, "GET", f"{proxy}/_test/cors")
    assert (reply.status, reply.headers["X-Kept"]) == (200, "passes")
    assert cors_of(reply.headers) == {}
    # An allowed page gets the proxy's answer for its own origin, not the API's wildcard.
    reply = await request(http, "GET", f"{proxy}/_test/cors", headers={"Origin": origin})
    assert cors_of(reply.headers) == {"Access-Control-Allow-Origin": origin}
