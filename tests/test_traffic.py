"""Heavy traffic: gigabyte streams with bounded memory, aborted transfers, live streams,
WebSockets, timeouts and backpressure, TLS with a private CA, the connection pool, workers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.standin import StandIn, pattern

from .conftest import INLINE_KEY_CONFIG, PERSONAL_KEY, ROOT_ORG, StartProxy, WriteConfig
from .processes import open_fds, peak_rss_mib, rss_mib, serving
from .support import eventually, request

GIB = 1024**3
CHUNK = 256 * 1024


async def gigabyte() -> AsyncIterator[bytes]:
    block = bytes(range(256)) * (CHUNK // 256)
    for _ in range(GIB // CHUNK):
        yield block


# Two gigabytes through a separate process; seconds alone, far more on a busy machine.
@pytest.mark.timeout(120)
async def test_gigabyte_upload_and_download_pass_intact_in_bounded_memory(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """A 1 GiB upload and a 1 GiB download pass through a separate proxy process byte-exact (same
    SHA-256) while its peak RSS stays under 120 MiB: bodies are streamed, never held whole."""
    async with serving(write_config(credentials=INLINE_KEY_CONFIG)) as (proxy, process):
        async with aiohttp.ClientSession() as http:
            reply = await request(http, "PUT", f"{proxy}/upload", data=gigabyte())
            assert reply.status == 200
            echoed = reply.json()
            expected = hashlib.sha256()
            async for block in gigabyte():
                expected.update(block)
            assert echoed["body_length"] == GIB
            assert echoed["body_sha256"] == expected.hexdigest()

            digest, received = hashlib.sha256(), 0
            async with http.get(
                f"{proxy}/_test/download", params={"size": str(GIB), "length": "1"}
            ) as response:
                assert response.status == 200
                assert response.headers["Content-Length"] == str(GIB)
                async for chunk in response.content.iter_chunked(CHUNK):
                    digest.update(chunk)
                    received += len(chunk)
            assert received == GIB
            wanted = hashlib.sha256()
            for chunk in pattern(GIB):
                wanted.update(chunk)
            assert digest.hexdigest() == wanted.hexdigest()
        # A proxy that held bodies would need a gigabyte; it holds a few chunks.
        assert peak_rss_mib(process.pid) < 120


async def test_200_aborted_transfers_leave_no_descriptor_or_upstream_connection_behind(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """Two hundred uploads and downloads aborted midway leave no open descriptor, API connection or
    in-flight upstream request behind, and the proxy keeps serving."""
    async with serving(write_config(credentials=INLINE_KEY_CONFIG)) as (proxy, process):
        host, port = proxy.removeprefix("http://").rsplit(":", 1)
        async with aiohttp.ClientSession() as http:
            assert (await request(http, "GET", f"{proxy}/warm-up")).status == 200
        await asyncio.sleep(0.2)
        fds_before, upstream_before = open_fds(process.pid), standin.api_connections

        async def abort(request: bytes, then_read: bool) -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            await writer.drain()
            if then_read:
                await reader.readexactly(100_000)  # mid-download
            else:
                await asyncio.sleep(0.01)  # mid-upload
            writer.transport.abort()

        upload = (
            b"PUT /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000\r\n\r\n"
            + b"u" * 200_000
        )
        download = b"GET /_test/download?size=100000000 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        for index in range(200):
            await abort(download if index % 2 else upload, then_read=bool(index % 2))

        deadline = time.monotonic() + 10
        # Back where they started, or lower (the warm-up's pooled connection may go too).
        while not (
            open_fds(process.pid) <= fds_before
            and standin.api_connections <= upstream_before
            and standin.in_flight == 0
        ):
            assert time.monotonic() < deadline, (
                open_fds(process.pid),
                fds_before,
                standin.api_connections,
                upstream_before,
                standin.in_flight,
            )
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            assert (await request(http, "GET", f"{proxy}/still/up")).status == 200


async def test_client_hanging_up_cancels_the_upstream_request_at_once(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """A client hanging up during a slow request cancels its upstream request within a second,
    instead of leaving it running to completion."""
    proxy = await start_proxy()
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /_test/slow?seconds=30 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await writer.drain()
    await eventually(lambda: standin.in_flight > 0)
    writer.transport.abort()
    hung_up = time.monotonic()
    while standin.in_flight:
        assert time.monotonic() - hung_up < 1, "the upstream request outlived its client"
        await asyncio.sleep(0.01)


async def test_server_sent_events_arrive_one_by_one_as_they_are_sent(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """Server-sent events (text/event-stream) reach the client one at a time as the API sends them,
    with no buffering that would hold one back."""
    standin.events_gate = asyncio.Event()
    proxy = await start_proxy()
    async with http.get(f"{proxy}/_test/events", params={"count": "3"}) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        for number in range(3):
            # The next event is only sent once this one has arrived: no buffering allowed.
            line = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            assert line == f"data: event {number}\n\n".encode()
            standin.events_gate.set()


async def test_websocket_is_relayed_both_ways_with_the_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A WebSocket is relayed both ways with its subprotocol, text and binary messages and the
    client's close code (4001), after the upgrade passed the API's token check."""
    proxy = await start_proxy()
    async with http.ws_connect(f"{proxy}/_test/ws", protocols=("appcircle.v1",)) as socket_:
        assert socket_.protocol == "appcircle.v1"
        await socket_.send_str("hello")
        assert await socket_.receive_str() == "echo: hello"
        await socket_.send_bytes(b"\x01\x02\x03")
        assert await socket_.receive_bytes() == b"\x03\x02\x01"
        await socket_.close(code=4001, message=b"client done")
    await eventually(lambda: standin.websocket_closes == [4001])
    assert standin.api_requests[-1].raw_path == "/_test/ws"  # it passed the token check


async def test_websocket_closed_by_the_api_closes_the_client_with_its_code(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A WebSocket the API closes reaches the client as a close with the API's code and reason
    (4000, "bye")."""
    proxy = await start_proxy()
    async with http.ws_connect(f"{proxy}/_test/ws") as socket_:
        await socket_.send_str("close-me")
        message = await asyncio.wait_for(socket_.receive(), 5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (4000, "bye")


async def test_websocket_handshake_refused_with_401_renews_the_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A WebSocket handshake the API refuses with 401 (token revoked) renews the token and succeeds,
    with exactly one extra exchange."""
    proxy = await start_proxy()
    assert (await request(http, "GET", f"{proxy}/x")).status == 200
    standin.revoke_all()
    async with http.ws_connect(f"{proxy}/_test/ws") as socket_:
        await socket_.send_str("again")
        assert await socket_.receive_str() == "echo: again"
    assert len(standin.exchanges) == 2


async def test_connect_timeout_gives_504(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An API host that never completes the TCP handshake gets 504 after appcircle.connect_timeout,
    well within 3 s."""
    # A listener that never accepts, its backlog full: new connections hang in SYN.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            fillers.append(filler)
        host, port = silent.getsockname()
        proxy = await start_proxy(
            appcircle={"api_url": f"http://{host}:{port}", "connect_timeout": 0.3}
        )
        started = time.monotonic()
        assert (await request(http, "GET", f"{proxy}/x")).status == 504
        assert time.monotonic() - started < 3
    finally:
        for filler in fillers:
            filler.close()
        silent.close()


async def test_slow_client_does_not_make_the_proxy_buffer_the_download(
    standin: StandIn, write_config: WriteConfig
) -> None:
    """A client that stops reading a 1 GiB download does not make the proxy buffer it: the process's
    RSS grows by less than 30 MiB in 2 s."""
    async with serving(write_config(credentials=INLINE_KEY_CONFIG)) as (proxy, process):
        host, port = proxy.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), limit=2**16)
        writer.write(b"GET /_test/download?size=1073741824 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        await reader.readexactly(1000)
        baseline = rss_mib(process.pid)
        await asyncio.sleep(2)  # the client reads nothing meanwhile
        assert rss_mib(process.pid) - baseline < 30
        writer.transport.abort()


async def test_idle_read_timeout_does_not_cut_a_long_healthy_download(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """appcircle.read_timeout bounds silence, not total time: a 50 MiB download that takes longer
    than the timeout but keeps flowing is received in full."""
    proxy = await start_proxy(appcircle={"read_timeout": 0.5})
    received = 0
    async with http.get(f"{proxy}/_test/download", params={"size": str(50 * 1024**2)}) as response:
        async for chunk in response.content.iter_chunked(1024**2):
            received += len(chunk)
            await asyncio.sleep(0.02)  # slower than the timeout in total, never silent for long
    assert received == 50 * 1024**2


@pytest.fixture
def private_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    bundle = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return ca, bundle


async def tls_standin(ca: trustme.CA) -> StandIn:
    appcircle = StandIn()
    appcircle.add_personal_key(PERSONAL_KEY, ROOT_ORG)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_context)
    await appcircle.start(tls=server_context)
    return appcircle


async def test_self_hosted_behind_a_private_ca_is_trusted_through_ca_file(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    private_ca: tuple[trustme.CA, Path],
) -> None:
    """A self-hosted Appcircle with a private CA is reached over TLS when appcircle.ca_file names
    the CA, and without it the client gets 503 auth_unreachable mentioning the certificate."""
    ca, bundle = private_ca
    appcircle = await tls_standin(ca)
    try:
        assert appcircle.api_url.startswith("https://")
        urls = {"api_url": appcircle.api_url, "auth_url": appcircle.auth_url}
        trusted = await start_proxy(appcircle={**urls, "ca_file": str(bundle)})
        assert (await request(http, "GET", f"{trusted}/build/v2/profiles")).status == 200
        untrusted = await start_proxy(appcircle=urls)
        reply = await request(http, "GET", f"{untrusted}/build/v2/profiles")
        assert reply.status == 503
        body = reply.json()
        assert body["error"] == "auth_unreachable" and "certificate" in body["detail"].lower()
    finally:
        await appcircle.close()


async def test_insecure_skip_verify_works_but_is_logged_loudly(
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    private_ca: tuple[trustme.CA, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """appcircle.insecure_skip_verify lets the proxy reach an untrusted TLS host, and a warning "TLS
    VERIFICATION IS OFF" is logged."""
    appcircle = await tls_standin(private_ca[0])
    try:
        proxy = await start_proxy(
            appcircle={
                "insecure_skip_verify": True,
                "api_url": appcircle.api_url,
                "auth_url": appcircle.auth_url,
            }
        )
        assert (await request(http, "GET", f"{proxy}/x")).status == 200
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("TLS VERIFICATION IS OFF" in warning for warning in warnings)
    finally:
        await appcircle.close()


async def test_full_connection_pool_makes_requests_wait_not_fail(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """With appcircle.max_connections = 2, six concurrent requests all get 200 by waiting their
    turn, and the API never sees more than two at once."""
    # One flow may use the whole pool here (flow_share 1): this is about waiting, not fairness.
    proxy = await start_proxy(appcircle={"max_connections": 2, "flow_share": 1})
    replies = await asyncio.gather(
        *(request(http, "GET", f"{proxy}/_test/slow?seconds=0.2") for _ in range(6))
    )
    assert [reply.status for reply in replies] == [200] * 6
    assert standin.max_in_flight == 2


async def test_workers_share_the_port_each_with_its_own_token_cache(
    standin: StandIn, write_config: WriteConfig, unused_tcp_port: int
) -> None:
    """With --workers 2 both workers serve the same port, each exchanges its token once (eagerly)
    and reuses it, and the supervisor exits 0 on SIGTERM."""
    config = write_config(
        credentials=INLINE_KEY_CONFIG,
        server={"eager": True, "listen": f"127.0.0.1:{unused_tcp_port}"},
    )
    async with serving(config, "--workers", "2") as (proxy, process):
        await eventually(lambda: len(standin.exchanges) == 2, within=10)  # eager, per worker
        for _ in range(40):  # fresh connections, spread over both workers by the kernel
            async with aiohttp.ClientSession() as http:
                assert (await request(http, "GET", f"{proxy}/x")).status == 200
        assert len(standin.exchanges) == 2
        assert len({request.token_id for request in standin.api_requests}) == 2
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
