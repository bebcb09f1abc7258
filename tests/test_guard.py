"""The inbound guard: Host allowlist, browsers, client token, no open proxy, path tricks,
smuggling, size limits, the Unix socket, and the warning for a wide-open listener."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from proxy.config.load import load_settings
from proxy.serve.server import start
from tests.standin import StandIn

from .conftest import CLIENT_TOKEN, StartProxy, WriteConfig
from .rawhttp import exchange, json_of, status_of
from .support import request

# -- Host allowlist ---------------------------------------------------------------------


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


# -- browsers ---------------------------------------------------------------------------


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


# -- client token -----------------------------------------------------------------------


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


# -- never an open proxy ----------------------------------------------------------------


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


# -- listeners --------------------------------------------------------------------------


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
