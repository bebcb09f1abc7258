"""Hostile and broken clients: each gets a clean refusal or a closed connection, nothing is
forwarded that should not be, and the proxy keeps serving afterwards."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import secrets
import socket
import string
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config.load import load_settings
from proxy.serve.server import Running, start
from tests.standin import StandIn

from .conftest import StartProxy
from .rawhttp import exchange, status_of
from .support import proxy_config, request

QUICK_TIMEOUT = {"header_timeout": 0.5}


async def still_serving(proxy: str) -> None:
    async with aiohttp.ClientSession() as http:
        assert (await request(http, "GET", f"{proxy}/still/up")).status == 200


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


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
    no_tracebacks(caplog)


async def test_truncated_body_is_dropped_and_the_proxy_keeps_serving(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that hangs up partway through a declared Content-Length body leaves no traceback and
    the proxy keeps serving others."""
    proxy = await start_proxy()
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await still_serving(proxy)
    no_tracebacks(caplog)


async def test_body_longer_than_declared_never_reaches_the_api_beyond_its_length(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """Bytes past the declared Content-Length are read as a next request and refused 400; if the
    first request was forwarded, it carried exactly its 5 declared bytes."""
    proxy = await start_proxy()
    answer = await exchange(
        proxy,
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhelloEXTRA BYTES\r\n\r\n",
        read_for=0.5,
    )
    # The surplus reads as a next request, which is garbage: refused, connection closed.
    # Arriving in the same packet, it gets the whole connection refused before anything
    # is forwarded; if the first request did go out, it carried exactly 5 bytes.
    assert b" 400 Bad Request" in answer
    if status_of(answer) == 200:
        body = answer.partition(b"\r\n\r\n")[2]
        assert b'"body_length": 5' in body
    else:
        assert standin.api_requests == []
    await still_serving(proxy)


async def test_slowloris_header_trickle_is_cut_off(start_proxy: StartProxy) -> None:
    """A client trickling its request head one byte at a time is disconnected within
    server.header_timeout (well under 3 s), and the proxy keeps serving."""
    proxy = await start_proxy(server=QUICK_TIMEOUT)
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    closed = False
    try:
        for byte in b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
    except ConnectionError:
        closed = True
    finally:
        writer.close()
    assert closed, "the server kept a trickling connection open"
    assert time.monotonic() - started < 3
    await still_serving(proxy)


async def test_a_thousand_idle_connections_do_not_stop_service_and_are_closed(
    start_proxy: StartProxy,
) -> None:
    """A thousand idle connections do not stop the proxy answering others, and each is closed once
    server.header_timeout passes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    proxy = await start_proxy(server={"header_timeout": 1.0})
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(1000)]
    try:
        await still_serving(proxy)
        await asyncio.sleep(1.5)
        results = await asyncio.gather(
            *(asyncio.wait_for(reader.read(1), 2) for reader, _ in idle), return_exceptions=True
        )
        assert all(result == b"" or isinstance(result, ConnectionError) for result in results)
    finally:
        for _, writer in idle:
            writer.close()
    await still_serving(proxy)


# -- property test: anything a client sends is forwarded faithfully or refused cleanly --


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


async def test_clients_hanging_up_before_the_answer_leave_no_traceback(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Fifty clients aborting their connection right after asking for a download leave no traceback,
    and the proxy keeps serving."""
    proxy = await start_proxy()
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    for _ in range(50):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /_test/download?size=1000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        writer.transport.abort()
    await asyncio.sleep(0.3)
    await still_serving(proxy)
    no_tracebacks(caplog)
