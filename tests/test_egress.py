"""A corporate egress proxy between the proxy and Appcircle (issue 18): HTTPS_PROXY,
HTTP_PROXY and NO_PROXY, upper or lower case, for the forwarding client (a CONNECT tunnel,
TLS inside it) and the token exchanges; a real forward proxy (pproxy) started here."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme

from proxy.upstream.egress import EgressError, egress_proxy_for
from tests.support.standin import StandIn

from .conftest import PERSONAL_KEY, ROOT_ORG, StartProxy, everything_logged
from .support import eventually, request

EGRESS_USER = "corp-user"
EGRESS_PASSWORD = "egress-pw-7f3a9"
# pproxy installs uvloop when it can and then asks for a loop uvloop will not make; it runs
# on asyncio's own. --auth 0: check the credentials on every connection, not once per IP.
PPROXY = (
    "import asyncio, sys\n"
    "sys.modules['uvloop'] = None\n"
    "import pproxy.server\n"
    "asyncio.set_event_loop(asyncio.new_event_loop())\n"
    "sys.argv = ['pproxy', '-l', sys.argv[1], '-v', '--auth', '0']\n"
    "pproxy.server.main()\n"
)

StartEgress = Callable[..., Awaitable[str]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Egress:
    """A running pproxy: its URL and what it printed (one line per connection it relayed)."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self._log = log

    def relayed(self) -> str:
        return self._log.read_text()


@pytest.fixture
async def start_egress(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Egress]]]:
    processes: list[asyncio.subprocess.Process] = []

    async def start(*, credentials: bool = False) -> Egress:
        port = free_port()
        listen = f"http://127.0.0.1:{port}" + (
            f"#{EGRESS_USER}:{EGRESS_PASSWORD}" if credentials else ""
        )
        log = tmp_path / f"pproxy-{port}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-u", "-c", PPROXY, listen, stdout=out, stderr=out
            )
        processes.append(process)
        await eventually(lambda: "Serving on" in log.read_text(), within=10)
        return Egress(f"http://127.0.0.1:{port}", log)

    yield start
    for process in processes:
        process.terminate()
        await process.wait()


@pytest.fixture
async def tls_standin() -> AsyncIterator[tuple[StandIn, trustme.CA]]:
    ca = trustme.CA()
    appcircle = StandIn()
    appcircle.add_personal_key(PERSONAL_KEY, ROOT_ORG)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    await appcircle.start(tls=server_context)
    yield appcircle, ca
    await appcircle.close()


def with_credentials(url: str, user: str = EGRESS_USER, password: str = EGRESS_PASSWORD) -> str:
    return url.replace("http://", f"http://{user}:{password}@")


async def test_tls_to_the_api_goes_through_a_connect_tunnel_with_the_proxy_credentials(
    start_proxy: StartProxy,
    start_egress: Callable[..., Awaitable[Egress]],
    tls_standin: tuple[StandIn, trustme.CA],
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guards HTTPS_PROXY for both clients: the API call is a CONNECT tunnel with TLS to
    the (private-CA) API inside it, the exchange goes through the proxy too, the egress
    credentials are sent as Basic (pproxy refuses without them) and never logged."""
    appcircle, ca = tls_standin
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    egress = await start_egress(credentials=True)
    monkeypatch.setenv("HTTPS_PROXY", with_credentials(egress.url))
    proxy = await start_proxy(
        appcircle={
            "api_url": appcircle.api_url,
            "auth_url": appcircle.auth_url,
            "ca_file": str(bundle),
        }
    )
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles")
    assert reply.status == 200, reply.body
    assert reply.json()["organization"] == ROOT_ORG
    relayed = egress.relayed()
    for url in (appcircle.api_url, appcircle.auth_url):
        assert "-> " + url.removeprefix("https://") in relayed
    assert "Unauthorized" not in relayed
    logged = everything_logged(caplog)
    assert EGRESS_PASSWORD not in logged
    assert f"through the egress proxy {egress.url}" in logged


async def test_plain_http_goes_through_the_egress_proxy_named_in_lowercase(
    start_proxy: StartProxy,
    start_egress: Callable[..., Awaitable[Egress]],
    standin: StandIn,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards http_proxy for http:// Appcircle URLs (a self-hosted one without TLS), for
    API calls, the exchange and WebSockets."""
    egress = await start_egress()
    monkeypatch.setenv("http_proxy", egress.url)
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles")
    assert reply.status == 200
    relayed = egress.relayed()
    api = "-> " + standin.api_url.removeprefix("http://")
    assert api in relayed
    assert "-> " + standin.auth_url.removeprefix("http://") in relayed
    before = relayed.count(api)
    async with http.ws_connect(f"{proxy}/_test/ws") as socket:
        await socket.send_str("hi")
        assert (await socket.receive_str()) == "echo: hi"
    await eventually(lambda: egress.relayed().count(api) == before + 1)


@pytest.mark.parametrize("names", [("HTTP_PROXY", "NO_PROXY"), ("http_proxy", "no_proxy")])
async def test_no_proxy_bypasses_the_egress_proxy(
    start_proxy: StartProxy,
    standin: StandIn,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    names: tuple[str, str],
) -> None:
    """Guards NO_PROXY: a host it names is reached directly, the egress proxy (here one
    that is down) never asked."""
    monkeypatch.setenv(names[0], f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(names[1], "localhost,127.0.0.1")
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/build/v2/profiles")).status == 200


async def test_an_egress_proxy_down_or_refusing_gives_a_clear_answer_naming_it(
    start_proxy: StartProxy,
    start_egress: Callable[..., Awaitable[Egress]],
    standin: StandIn,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Guards the failures: an egress proxy that is down, or refuses the tunnel (407 for
    wrong credentials), gives 502 naming it for the API and 503 naming it for the token
    exchange; no traceback, no password in the answer or the logs."""
    auth_via_localhost = standin.auth_url.replace("127.0.0.1", "localhost")
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HTTP_PROXY", down)
    # The exchange is direct (NO_PROXY names localhost); the API call meets the egress.
    monkeypatch.setenv("NO_PROXY", "localhost")
    proxy = await start_proxy(appcircle={"auth_url": auth_via_localhost})
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles")
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_unreachable"
    assert f"cannot connect to the egress proxy {down}" in reply.json()["detail"]

    egress = await start_egress(credentials=True)
    monkeypatch.setenv("HTTP_PROXY", with_credentials(egress.url, password="wrong-pw-1"))
    proxy = await start_proxy(appcircle={"auth_url": auth_via_localhost})
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles")
    assert reply.status == 502
    detail = reply.json()["detail"]
    assert f"the egress proxy {egress.url} refused the tunnel" in detail
    assert "407" in detail and "wrong-pw-1" not in detail

    # Now the exchange meets the egress proxy that is down.
    monkeypatch.setenv("HTTP_PROXY", down)
    monkeypatch.delenv("NO_PROXY")
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles")
    assert reply.status == 503
    assert "egress proxy" in reply.json()["detail"]
    logged = everything_logged(caplog)
    assert "Traceback" not in logged and "wrong-pw-1" not in logged
    assert standin.api_requests == []


def test_an_https_egress_proxy_url_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the start-up check: a proxy URL the tunnel cannot use is a plain config error."""
    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.example:3128")
    with pytest.raises(EgressError, match="must be an http:// URL"):
        egress_proxy_for("https://api.appcircle.io")
    monkeypatch.setenv("NO_PROXY", ".appcircle.io")
    assert egress_proxy_for("https://api.appcircle.io") is None
