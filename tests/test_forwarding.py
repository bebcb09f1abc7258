"""Forwarding: methods, paths and queries byte for byte, headers, bodies, errors."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.standin import StandIn

from .conftest import ROOT_ORG, StartProxy
from .rawhttp import exchange
from .support import request


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
