"""Forwarding: a request to the API and its answer back, byte for byte: methods,
paths, headers, bodies of every size, streams, redirects, 100-continue, and how a failure
of the API reaches the client."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.support.standin import StandIn, pattern

from .conftest import (
    INLINE_KEY_CONFIG,
    PERSONAL_KEY,
    ROOT_ORG,
    StartProxy,
    WriteConfig,
)
from .support import (
    assert_no_tracebacks,
    eventually,
    request,
)
from .support.processes import open_fds, peak_rss_mib, rss_mib, serving
from .support.rawapi import HeadAnswer, RawApi
from .support.rawclient import exchange, json_of, status_of


async def still_serving(proxy: str) -> None:
    async with aiohttp.ClientSession() as http:
        assert (await request(http, "GET", f"{proxy}/still/up")).status == 200


GIB = 1024**3


CHUNK = 256 * 1024


async def gigabyte() -> AsyncIterator[bytes]:
    block = bytes(range(256)) * (CHUNK // 256)
    for _ in range(GIB // CHUNK):
        yield block


async def test_get_reaches_api_with_bearer_session_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A GET reaches the API at the same path with Authorization: Bearer and the session token of
    the configured organization, obtained by a single token exchange."""
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles")
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["raw_path"] == "/build/v2/profiles"
    assert seen["organization"] == ROOT_ORG
    authorization = dict((k.lower(), v) for k, v in seen["headers"])["authorization"]
    assert authorization.startswith("Bearer ey")
    assert len(standin.exchanges) == 1


async def test_path_and_query_go_upstream_byte_for_byte(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Path and query reach the API byte for byte: percent-escapes, ';' parameters, empty and
    repeated query parameters are neither decoded nor reordered."""
    proxy = await start_proxy()
    raw = "/build/v1/queue/my-dashboard?page=1&size=1000&q=a%20b%2Fc&empty=&dup=1&dup=2"
    reply = await request(http, "GET", URL(proxy + raw, encoded=True))
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["raw_path"] == raw
    reply = await request(http, "GET", URL(proxy + "/task/v1/tasks/a%20b;v=1", encoded=True))
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["raw_path"] == "/task/v1/tasks/a%20b;v=1"


async def test_every_method_is_forwarded(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """GET, POST, PUT, PATCH, DELETE, OPTIONS and HEAD are all forwarded with their method
    unchanged."""
    proxy = await start_proxy()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        reply = await request(
            http, method, f"{proxy}/any/thing", data=b"x" if method != "GET" else None
        )
        assert reply.status == 200, reply.body
        seen = reply.json()
        assert seen["method"] == method
    assert (await request(http, "HEAD", f"{proxy}/any/thing")).status == 200


async def test_client_credentials_and_hop_by_hop_headers_do_not_go_upstream(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """The client's Authorization is replaced by the proxy's, Proxy-Authorization and hop-by-hop
    headers (including those named in Connection) are dropped, and end-to-end headers pass."""
    proxy = await start_proxy()
    reply = await request(
        http,
        "GET",
        f"{proxy}/x",
        headers={
            "Authorization": "Bearer client-supplied",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Connection": "keep-alive, X-Hop-Private",
            "X-Hop-Private": "drop me",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Connection": "keep-alive",
            "X-Custom": "kept",
            "Accept": "application/vnd.custom+json",
            "User-Agent": "appcircle-cli/2.0",
            "Accept-Encoding": "gzip, compress, deflate, br",
        },
    )
    assert reply.status == 200, reply.body
    seen = reply.json()
    headers = [(k.lower(), v) for k, v in seen["headers"]]
    names = [k for k, _ in headers]
    for dropped in (
        "proxy-authorization",
        "connection",
        "x-hop-private",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
    ):
        assert dropped not in names, dropped
    as_dict = dict(headers)
    assert names.count("authorization") == 1
    assert as_dict["authorization"] != "Bearer client-supplied"
    assert as_dict["x-custom"] == "kept"
    assert as_dict["accept"] == "application/vnd.custom+json"
    assert as_dict["user-agent"] == "appcircle-cli/2.0"
    assert as_dict["accept-encoding"] == "gzip, compress, deflate, br"


async def test_host_header_is_the_upstreams(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """The Host header sent upstream is the API's host, not the one the client used for the
    proxy."""
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/x", headers={"Host": "localhost:1234"})
    assert reply.status == 200, reply.body
    seen = reply.json()
    host = dict((k.lower(), v) for k, v in seen["headers"])["host"]
    assert "http://" + host == standin.api_url


async def test_response_hop_by_hop_headers_are_removed(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """Hop-by-hop response headers (Keep-Alive, Proxy-Authenticate, those named in Connection)
    are removed from the API's answer while end-to-end ones pass."""
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/_test/hop-by-hop")
    assert reply.status == 200
    assert reply.headers["X-Kept"] == "passes"
    for dropped in ("X-Private-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert dropped not in reply.headers


async def test_content_encoding_passes_through_undecoded(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A gzip answer reaches the client still compressed with Content-Encoding: gzip, not decoded
    by the proxy."""
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/_test/gzip", headers={"Accept-Encoding": "gzip"})
    assert reply.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(reply.body) == b'{"compressed": true}'


async def test_large_and_chunked_bodies_stream_intact(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A 3 MiB upload with a length and the same bytes sent chunked both reach the API intact
    (same SHA-256), the chunked one still chunked."""
    proxy = await start_proxy()
    payload = os.urandom(3 * 1024 * 1024)
    reply = await request(
        http, "POST", f"{proxy}/distribution/v2/profiles/p/app-versions", data=io.BytesIO(payload)
    )
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["body_length"] == len(payload)
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()

    async def chunks() -> Any:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    reply = await request(http, "PUT", f"{proxy}/upload", data=chunks())
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
    transfer = dict((k.lower(), v) for k, v in seen["headers"]).get("transfer-encoding")
    assert transfer == "chunked"


async def test_redirect_is_not_followed_and_location_points_back_at_the_proxy(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A 302 from the API is relayed, not followed; a Location on the API is rewritten to the
    proxy under the route's prefix, and one to another host is left unchanged."""
    proxy = await start_proxy(routes={"eu": {"prefix": "/eu", "credential": "main"}})
    redirect = f"{proxy}/eu/_test/redirect"
    reply = await request(http, "GET", redirect, allow_redirects=False)
    assert reply.status == 302
    assert reply.headers["Location"] == f"{proxy}/eu/build/v2/profiles?page=1"
    elsewhere = "https://uploads.example.com/signed?sig=abc"
    reply = await request(http, "GET", redirect, params={"to": elsewhere}, allow_redirects=False)
    assert reply.headers["Location"] == elsewhere
    reply = await request(
        http, "GET", redirect, params={"to": "/distribution/v2/x"}, allow_redirects=False
    )
    assert reply.headers["Location"] == f"{proxy}/eu/distribution/v2/x"


async def test_upstream_status_and_body_come_back_unchanged(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An unusual API status (418) and its body come back to the client unchanged."""
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/_test/status/418")
    assert reply.status == 418
    assert reply.json() == {"status": "as asked"}


async def test_unknown_prefix_gets_404_listing_the_prefixes(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """A path under no route's prefix gets 404 no_route listing the configured prefixes; a prefix
    matches whole segments only (/eux is not /eu)."""
    proxy = await start_proxy(
        routes={
            "eu": {"prefix": "/eu", "credential": "main"},
            "us": {"prefix": "/us/", "credential": "main"},
        }
    )
    reply = await request(http, "GET", f"{proxy}/elsewhere/x")
    assert reply.status == 404
    body = reply.json()
    assert body["error"] == "no_route"
    assert body["prefixes"] == ["/eu", "/us"]
    assert "/eu" in body["detail"] and "/us" in body["detail"]
    assert (await request(http, "GET", f"{proxy}/eux/x")).status == 404


async def test_unreachable_api_gets_502(
    start_proxy: StartProxy, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    """An API nobody listens for gets 502 upstream_unreachable with a detail naming api_url."""
    proxy = await start_proxy(appcircle={"api_url": f"http://127.0.0.1:{unused_tcp_port}"})
    reply = await request(http, "GET", f"{proxy}/build/v2/profiles")
    assert reply.status == 502
    body = reply.json()
    assert body["error"] == "upstream_unreachable"
    assert "api_url" in body["detail"]


async def test_slow_api_gets_504_after_the_read_timeout(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """An API slower than appcircle.read_timeout gets 504 upstream_timeout naming the API, and
    the request is sent once, not retried."""
    proxy = await start_proxy(appcircle={"read_timeout": 0.2})
    reply = await request(http, "GET", f"{proxy}/_test/slow", params={"seconds": "2"})
    assert reply.status == 504
    assert reply.json()["error"] == "upstream_timeout"
    assert standin.api_url in reply.json()["detail"]
    # Sent once: only a connection that died before any answer is worth a second try.
    assert [r.raw_path for r in standin.api_requests].count("/_test/slow?seconds=2") == 1


async def test_api_failing_mid_response_cuts_the_client_connection(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An API connection failing partway through a streamed body cuts the client's connection, so
    a truncated body is never passed off as complete, and the proxy keeps serving."""
    proxy = await start_proxy()
    async with http.get(f"{proxy}/_test/cut") as response:
        assert response.status == 200
        try:
            await response.read()
        except aiohttp.ClientPayloadError:
            pass
        else:
            raise AssertionError("a truncated body was passed off as complete")
    reply = await request(http, "GET", f"{proxy}/still/serving")
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["raw_path"] == "/still/serving"


async def test_the_apis_status_line_comes_back_reason_phrase_included(
    start_proxy: StartProxy,
) -> None:
    """The API's status line, custom reason phrase included, reaches the client for small,
    streamed, HEAD and 204 answers."""
    proxy = await start_proxy()
    custom = "/_test/status/299?reason=Custom%20Reason"
    for method, target, status_line in [
        ("GET", custom, b"HTTP/1.1 299 Custom Reason"),  # a small body, sent in one write
        ("GET", custom + "&size=200000", b"HTTP/1.1 299 Custom Reason"),  # a large one, streamed
        ("HEAD", custom, b"HTTP/1.1 299 Custom Reason"),  # no body at all
        ("GET", "/_test/status/204?reason=Nothing%20Here", b"HTTP/1.1 204 Nothing Here"),
    ]:
        answer = await exchange(
            proxy,
            f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode(),
            read_for=2,
        )
        assert answer.split(b"\r\n", 1)[0] == status_line, (method, target)


async def test_answers_without_a_body_leave_the_connection_reusable(
    start_proxy: StartProxy,
) -> None:
    """204 and HEAD answers carry no body and leave the keep-alive connection usable for the next
    request; a HEAD keeps the Content-Length the GET's body would have."""
    proxy = await start_proxy()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one_connection:
        for method, path, status in [
            ("GET", "/_test/status/204", 204),
            ("HEAD", "/_test/status/404", 404),
            ("HEAD", "/x", 200),
            ("GET", "/x", 200),
        ]:
            reply = await asyncio.wait_for(request(one_connection, method, proxy + path), 5)
            assert reply.status == status, (method, path)
            assert (reply.body == b"") is (path != "/x" or method == "HEAD"), (method, path)
        # A HEAD answer carries the length the GET's body would have.
        head = await request(one_connection, "HEAD", f"{proxy}/_test/status/404")
        get = await request(one_connection, "GET", f"{proxy}/_test/status/404")
        assert head.headers["Content-Length"] == str(len(get.body))


async def test_an_api_failing_inside_a_small_answer_gets_502_before_anything_is_sent(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """An API failing inside a small answer with a Content-Length is reported as 502
    upstream_unreachable naming the API, since nothing was sent to the client yet."""
    proxy = await start_proxy()
    reply = await request(http, "GET", f"{proxy}/_test/cut", params={"length": "5000"})
    assert reply.status == 502
    assert reply.json()["error"] == "upstream_unreachable"
    assert standin.api_url in reply.json()["detail"]  # which API, for the reader


async def test_an_api_failing_inside_a_chunked_answer_cuts_the_client_connection(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An API failing inside a chunked answer cuts the client's connection (a payload error, not
    a clean end), and the proxy keeps serving."""
    # With no length to fall short of, only a cut connection tells the client.
    proxy = await start_proxy()
    with pytest.raises(aiohttp.ClientPayloadError):
        await request(http, "GET", f"{proxy}/_test/cut", params={"length": "chunked"})
    assert (await request(http, "GET", f"{proxy}/still/serving")).status == 200


@pytest.mark.parametrize(
    "given",
    [b"r" * 129, b"has space", "caf\u00e9".encode(), b"tab\there"],
    ids=["too-long", "space", "non-ascii", "tab"],
)
async def test_an_unfit_request_id_is_replaced_not_kept(
    start_proxy: StartProxy, standin: StandIn, given: bytes
) -> None:
    """X-Request-Id goes upstream and into the log: one that is too long or holds a space,
    a control or non-ASCII byte is replaced by the proxy's own, both ways."""
    proxy = await start_proxy()
    answered = await exchange(
        proxy,
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: %s\r\n"
        b"Connection: close\r\n\r\n" % given,
    )
    head = answered.partition(b"\r\n\r\n")[0]
    (sent_back,) = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    ]
    assert sent_back != given.strip() and sent_back
    assert given.strip() not in answered


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
    assert_no_tracebacks(caplog)


async def test_a_small_chunked_upload_is_replayed_after_a_401_like_any_small_body(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
) -> None:
    """A small body sent with Transfer-Encoding: chunked is replayed with a renewed token after the
    API's 401, as a Content-Length body would be, so the client gets 200 and not the 401."""

    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(api.heads) == 1:  # the API refuses the first token it sees (revoked, say)
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    api = await scripted_api(answer)
    proxy = await start_proxy(appcircle={"api_url": api.url})
    # Five bytes, sent chunked (as fetch() with a stream body, or curl -T -, sends them).
    answered = await exchange(
        proxy,
        b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    # With Content-Length: 5 the proxy renews and replays; chunked, the client gets the 401.
    assert status_of(answered) == 200, answered


async def test_two_location_headers_from_the_api_come_back_as_one_rewritten(
    start_proxy: StartProxy,
    scripted_api: Callable[[HeadAnswer], Awaitable[RawApi]],
    http: aiohttp.ClientSession,
) -> None:
    """Browsers refuse an answer with two Location headers, and a second one could point
    anywhere: the client gets the first, pointing back through the proxy, and only it."""
    api_url = ""

    async def answer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 302 Found\r\n"
            b"Location: " + api_url.encode() + b"/build/v2/profiles\r\n"
            b"Location: https://elsewhere.example/steal\r\n"
            b"Content-Length: 0\r\n\r\n"
        )

    api = await scripted_api(answer)
    api_url = api.url
    proxy = await start_proxy(appcircle={"api_url": api.url})
    reply = await request(http, "GET", f"{proxy}/x", allow_redirects=False)
    assert reply.status == 302
    assert reply.headers.getall("Location") == [f"{proxy}/build/v2/profiles"]


async def test_an_api_url_with_a_path_keeps_it_upstream_and_out_of_rewritten_locations(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    """An api_url with a path (/api) is prefixed to every upstream request and stripped from
    Location headers rewritten to the proxy; locations outside that path are left as they are."""
    gateway = StandIn(api_base_path="/api")  # the API only answers under /api
    gateway.add_personal_key(PERSONAL_KEY, ROOT_ORG)
    await gateway.start()
    try:
        proxy = await start_proxy(
            routes={"eu": {"prefix": "/eu", "credential": "main"}},
            appcircle={"api_url": f"{gateway.api_url}/api", "auth_url": gateway.auth_url},
        )
        reply = await request(http, "GET", f"{proxy}/eu/build/v2/profiles?page=2")
        assert reply.status == 200, reply.body
        assert reply.json()["raw_path"] == "/api/build/v2/profiles?page=2"

        redirect = f"{proxy}/eu/_test/redirect"
        expectations = {
            None: f"{proxy}/eu/build/v2/profiles?page=1",  # absolute, under the base path
            "/api/distribution/v2/x#top": f"{proxy}/eu/distribution/v2/x#top",
            "/api": f"{proxy}/eu/",
            # Outside the base path: not the API's, so left as it is.
            f"{gateway.api_url}/other/x": f"{gateway.api_url}/other/x",
            "/apiary/x": "/apiary/x",
        }
        for to, location in expectations.items():
            params = {} if to is None else {"to": to}
            reply = await request(http, "GET", redirect, params=params, allow_redirects=False)
            assert (reply.status, reply.headers["Location"]) == (302, location), to
    finally:
        await gateway.close()


async def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """The proxy itself answers Expect: 100-continue, receives the body, and forwards the request
    without the Expect header."""
    proxy = await start_proxy()
    host, port = proxy.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        await writer.drain()
        # The client holds its body back until told to go on.
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        writer.write(b"hello")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        seen = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
    finally:
        writer.close()
    assert seen["body_length"] == 5
    assert "expect" not in [name.lower() for name, _ in seen["headers"]]
    (upstream,) = standin.api_requests
    assert "expect" not in [name.lower() for name, _ in upstream.headers]


async def test_a_refused_request_gets_its_refusal_instead_of_100_continue(
    start_proxy: StartProxy, standin: StandIn
) -> None:
    """A request with Expect: 100-continue that the guard refuses gets its 403 before sending a
    body, and an unknown expectation gets 417 expectation_failed; neither reaches the API."""
    proxy = await start_proxy()
    head = b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\n"
    # Refused by the guard: the client learns it before sending its body.
    answer = await exchange(
        proxy, head + b"Host: evil.example\r\nExpect: 100-continue\r\n\r\n", read_for=0.5
    )
    assert status_of(answer) == 403
    # An expectation the proxy does not know.
    answer = await exchange(
        proxy, head + b"Host: localhost\r\nExpect: something-else\r\n\r\n", read_for=0.5
    )
    assert status_of(answer) == 417
    assert json_of(answer)["error"] == "expectation_failed"
    assert standin.api_requests == []


async def test_a_scheme_relative_or_unreadable_location_is_relayed_not_a_500(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    """A scheme-relative Location to the API host is rewritten to the proxy, and one to another host
    or one that cannot be parsed is relayed unchanged with the 302, not turned into a 500."""
    proxy = await start_proxy()
    api_host = standin.api_url.removeprefix("http://")
    expectations = {
        f"//{api_host}/build/v2/x": f"{proxy}/build/v2/x",  # the API's, scheme-relative
        "//uploads.example.com/x": "//uploads.example.com/x",
        "http://[::1": "http://[::1",
    }
    for to, location in expectations.items():
        reply = await request(
            http, "GET", f"{proxy}/_test/redirect", params={"to": to}, allow_redirects=False
        )
        assert (reply.status, reply.headers.get("Location")) == (302, location), to


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
