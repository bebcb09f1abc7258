"""Forwarding: methods, paths and queries byte for byte, headers, bodies, errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from typing import Any

import aiohttp
from yarl import URL

from proxy.standin import StandIn

from .conftest import ROOT_ORG, StartProxy


async def echo(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Any:
    async with http.request(method, url, **kwargs) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_get_reaches_api_with_bearer_session_token(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    seen = await echo(http, "GET", f"{proxy}/build/v2/profiles")
    assert seen["raw_path"] == "/build/v2/profiles"
    assert seen["organization"] == ROOT_ORG
    authorization = dict((k.lower(), v) for k, v in seen["headers"])["authorization"]
    assert authorization.startswith("Bearer ey")
    assert len(standin.exchanges) == 1


async def test_path_and_query_go_upstream_byte_for_byte(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    raw = "/build/v1/queue/my-dashboard?page=1&size=1000&q=a%20b%2Fc&empty=&dup=1&dup=2"
    seen = await echo(http, "GET", URL(proxy + raw, encoded=True))
    assert seen["raw_path"] == raw
    seen = await echo(http, "GET", URL(proxy + "/task/v1/tasks/a%20b;v=1", encoded=True))
    assert seen["raw_path"] == "/task/v1/tasks/a%20b;v=1"


async def test_every_method_is_forwarded(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        seen = await echo(
            http, method, f"{proxy}/any/thing", data=b"x" if method != "GET" else None
        )
        assert seen["method"] == method
    async with http.head(f"{proxy}/any/thing") as response:
        assert response.status == 200


async def test_client_credentials_and_hop_by_hop_headers_do_not_go_upstream(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    seen = await echo(
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
    proxy = await start_proxy()
    seen = await echo(http, "GET", f"{proxy}/x", headers={"Host": "localhost:1234"})
    host = dict((k.lower(), v) for k, v in seen["headers"])["host"]
    assert "http://" + host == standin.api_url


async def test_response_hop_by_hop_headers_are_removed(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    async with http.get(f"{proxy}/_test/hop-by-hop") as response:
        assert response.status == 200
        assert response.headers["X-Kept"] == "passes"
        for dropped in ("X-Private-Hop", "Keep-Alive", "Proxy-Authenticate"):
            assert dropped not in response.headers


async def test_content_encoding_passes_through_undecoded(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    async with http.get(f"{proxy}/_test/gzip", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        body = await response.read()
    assert gzip.decompress(body) == b'{"compressed": true}'


async def test_large_and_chunked_bodies_stream_intact(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    payload = os.urandom(3 * 1024 * 1024)
    seen = await echo(
        http, "POST", f"{proxy}/distribution/v2/profiles/p/app-versions", data=io.BytesIO(payload)
    )
    assert seen["body_length"] == len(payload)
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()

    async def chunks() -> Any:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    seen = await echo(http, "PUT", f"{proxy}/upload", data=chunks())
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest()
    transfer = dict((k.lower(), v) for k, v in seen["headers"]).get("transfer-encoding")
    assert transfer == "chunked"


async def test_redirect_is_not_followed_and_location_points_back_at_the_proxy(
    start_proxy: StartProxy, standin: StandIn, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        """
[credentials.main]
kind = "personal-access-key"
secret_env = "TEST_APPCIRCLE_KEY"
[routes.eu]
prefix = "/eu"
credential = "main"
"""
    )
    async with http.get(f"{proxy}/eu/_test/redirect", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == f"{proxy}/eu/build/v2/profiles?page=1"
    elsewhere = "https://uploads.example.com/signed?sig=abc"
    async with http.get(
        f"{proxy}/eu/_test/redirect", params={"to": elsewhere}, allow_redirects=False
    ) as response:
        assert response.headers["Location"] == elsewhere
    async with http.get(
        f"{proxy}/eu/_test/redirect", params={"to": "/distribution/v2/x"}, allow_redirects=False
    ) as response:
        assert response.headers["Location"] == f"{proxy}/eu/distribution/v2/x"


async def test_upstream_status_and_body_come_back_unchanged(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    async with http.get(f"{proxy}/_test/status/418") as response:
        assert response.status == 418
        assert await response.json() == {"status": "as asked"}


async def test_unknown_prefix_gets_404_listing_the_prefixes(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        """
[credentials.main]
kind = "personal-access-key"
secret_env = "TEST_APPCIRCLE_KEY"
[routes.eu]
prefix = "/eu"
credential = "main"
[routes.us]
prefix = "/us/"
credential = "main"
"""
    )
    async with http.get(f"{proxy}/elsewhere/x") as response:
        assert response.status == 404
        body = await response.json()
    assert body["error"] == "no_route"
    assert body["prefixes"] == ["/eu", "/us"]
    assert "/eu" in body["detail"] and "/us" in body["detail"]
    async with http.get(f"{proxy}/eux/x") as response:
        assert response.status == 404


async def test_unreachable_api_gets_502(
    start_proxy: StartProxy, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    proxy = await start_proxy(api_url=f"http://127.0.0.1:{unused_tcp_port}")
    async with http.get(f"{proxy}/build/v2/profiles") as response:
        assert response.status == 502
        body = await response.json()
    assert body["error"] == "upstream_unreachable"
    assert "api_url" in body["detail"]


async def test_slow_api_gets_504_after_the_read_timeout(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(appcircle="read_timeout = 0.2")
    async with http.get(f"{proxy}/_test/slow", params={"seconds": "2"}) as response:
        assert response.status == 504
        assert (await response.json())["error"] == "upstream_timeout"


async def test_api_failing_mid_response_cuts_the_client_connection(
    start_proxy: StartProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy()
    async with http.get(f"{proxy}/_test/cut") as response:
        assert response.status == 200
        try:
            await response.read()
        except aiohttp.ClientPayloadError:
            pass
        else:
            raise AssertionError("a truncated body was passed off as complete")
    seen = await echo(http, "GET", f"{proxy}/still/serving")
    assert seen["raw_path"] == "/still/serving"
