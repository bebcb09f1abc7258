"""The header rules, case by case: what goes upstream, what comes back, and the
Location rewrite of a redirect at the API."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.headers import (
    raw_request_headers,
    raw_response_headers,
    request_headers,
    response_headers,
    rewrite_location,
)
from proxy.serve.body import Body
from proxy.serve.call import may_send_again
from proxy.upstream.connection import UpstreamError

API = "https://api.appcircle.io"


PROXY = "http://localhost:8787"


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


HOP_BY_HOP = (
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "h2c"),
    ("Proxy-Authorization", "Basic c2VjcmV0"),
    ("Proxy-Connection", "keep-alive"),
    ("proxy-anything", "x"),
)


RAW_HOP_BY_HOP = [(name.encode(), value.encode()) for name, value in HOP_BY_HOP]


@pytest.mark.parametrize(
    ("location", "prefix", "rewritten"),
    [
        (f"{API}/build/v2/profiles", "/", f"{PROXY}/build/v2/profiles"),
        (f"{API}/build/v2/profiles", "/eu", f"{PROXY}/eu/build/v2/profiles"),
        (f"{API}/x?page=1&q=a%2Fb#top", "/eu", f"{PROXY}/eu/x?page=1&q=a%2Fb#top"),
        (f"{API}/a%20b;v=1", "/", f"{PROXY}/a%20b;v=1"),
        (f"{API}", "/eu", f"{PROXY}/eu/"),
        ("/distribution/v2/x", "/eu", f"{PROXY}/eu/distribution/v2/x"),
        ("/x?y", "/", f"{PROXY}/x?y"),
        ("//api.appcircle.io/x", "/eu", f"{PROXY}/eu/x"),  # scheme-relative, at the API
    ],
)
def test_a_location_at_the_api_points_back_at_the_proxy_and_the_routes_prefix(
    location: str, prefix: str, rewritten: str
) -> None:
    """rewrite_location() points an absolute, path-only or scheme-relative Location at the API
    back at the proxy under the route's prefix, keeping query, fragment and escapes as they are."""
    assert rewrite_location(location, API, prefix, "http", "localhost:8787") == rewritten


@pytest.mark.parametrize(
    "location",
    [
        "https://uploads.example.com/signed?sig=abc",  # another host: a signed upload URL
        "http://api.appcircle.io/x",  # another scheme
        "https://api.appcircle.io:8443/x",  # another port
        "//uploads.example.com/x",  # scheme-relative, elsewhere
        "http://[::1",  # unreadable: passed on, never an error
        "relative/x",
        "?page=2",
        "",
    ],
)
def test_any_other_location_is_left_as_it_is(location: str) -> None:
    """A Location at another host, scheme or port, a relative one, an empty or unreadable one is
    returned unchanged, never an error."""
    assert rewrite_location(location, API, "/eu", "http", "localhost:8787") == location


@pytest.mark.parametrize("api_url", [f"{API}/api", f"{API}/api/"])
@pytest.mark.parametrize(
    ("location", "rewritten"),
    [
        (f"{API}/api/build/v2/profiles?page=1", f"{PROXY}/eu/build/v2/profiles?page=1"),
        ("/api/x#f", f"{PROXY}/eu/x#f"),
        ("/api", f"{PROXY}/eu/"),
        ("/api?x=1", f"{PROXY}/eu/?x=1"),
        # Outside the API's base path: not the API's, so left alone.
        (f"{API}/other", f"{API}/other"),
        ("/apiary/x", "/apiary/x"),
        ("/", "/"),
    ],
)
def test_the_api_urls_own_path_is_taken_out_and_only_what_is_below_it_rewritten(
    api_url: str, location: str, rewritten: str
) -> None:
    """With an api_url that has a path (with or without trailing slash), only locations under
    that path are rewritten, with the path taken out; others are left alone."""
    assert rewrite_location(location, api_url, "/eu", "http", "localhost:8787") == rewritten


def test_the_clients_scheme_and_host_are_used() -> None:
    """The rewritten Location uses the scheme and Host the client reached the proxy with."""
    assert (
        rewrite_location(f"{API}/x", API, "/", "https", "proxy.internal:9000")
        == "https://proxy.internal:9000/x"
    )


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH"])
@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("answered", [True, False])
@pytest.mark.parametrize("resent", [True, False])
def test_a_request_is_sent_again_only_when_every_condition_holds(
    method: str, kept: bool, answered: bool, resent: bool
) -> None:
    """Guards the one resend rule: idempotent method, body kept, no byte of an answer,
    and not already a second sending (retry or 401 replay), every combination."""
    body = Body(b"x" if kept else None, b"")
    failure = UpstreamError("closed", replayable=not answered)
    expected = method in {"GET", "HEAD", "OPTIONS", "PUT", "DELETE"} and kept
    expected = expected and not answered and not resent
    assert may_send_again(method, body, failure, resent=resent) is expected


def test_hop_by_hop_headers_stay_on_their_hop_both_ways() -> None:
    """Hop-by-hop headers (Connection, Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, any
    Proxy-*) are dropped both from requests going up and from answers coming back."""
    incoming = headers(*HOP_BY_HOP, ("X-Kept", "1"))
    assert list(request_headers(incoming).items()) == [("X-Kept", "1")]
    assert list(response_headers(incoming).items()) == [("X-Kept", "1")]


def test_headers_named_by_connection_are_dropped_whatever_their_case_and_spacing() -> None:
    """Headers named in any Connection header are dropped both ways, whatever their case, spacing
    or empty list items."""
    incoming = headers(
        ("Connection", "X-One,x-TWO"),
        ("Connection", " X-Three ,, keep-alive"),
        ("X-One", "a"),
        ("X-Two", "b"),
        ("x-three", "c"),
        ("X-Four", "d"),
    )
    assert list(request_headers(incoming).items()) == [("X-Four", "d")]
    assert list(response_headers(incoming).items()) == [("X-Four", "d")]


def test_host_authorization_and_expect_are_the_proxys_to_set_on_the_way_up() -> None:
    """Host, Authorization and Expect from the client are dropped on the way up, since the proxy
    sets its own."""
    incoming = headers(
        ("Host", "localhost:8787"),
        ("Authorization", "Bearer client-supplied"),
        ("Expect", "100-continue"),
        ("Accept", "application/json"),
    )
    assert list(request_headers(incoming).items()) == [("Accept", "application/json")]


def test_the_answer_keeps_what_only_the_way_up_drops() -> None:
    """Authorization, Expect, Host and WWW-Authenticate in an answer pass back to the client:
    only the way up drops them."""
    incoming = headers(
        ("Authorization", "x"), ("Expect", "y"), ("Host", "z"), ("WWW-Authenticate", "Bearer")
    )
    assert list(response_headers(incoming).items()) == list(incoming.items())


def test_everything_else_passes_in_order_with_repeats_and_the_senders_spelling() -> None:
    """Every other header passes both ways in its order, repeats kept (Set-Cookie), with the
    sender's spelling of its name."""
    incoming = headers(
        ("set-cookie", "a=1"),
        ("X-Custom", "v"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
        ("User-Agent", "appcircle-cli/2.0"),
    )
    assert list(request_headers(incoming).items()) == list(incoming.items())
    assert list(response_headers(incoming).items()) == list(incoming.items())


def test_raw_request_lines_keep_only_what_the_api_should_see_as_sent() -> None:
    """raw_request_headers() drops hop-by-hop, Connection-named, Host, Authorization, Expect,
    Content-Length and X-Request-Id lines, and keeps the rest in order with the client's
    spelling."""
    raw = [
        *RAW_HOP_BY_HOP,
        (b"Connection", b"X-One,x-TWO"),
        (b"X-One", b"a"),
        (b"X-Two", b"b"),
        (b"Host", b"localhost:8787"),
        (b"Authorization", b"Bearer client-supplied"),
        (b"Expect", b"100-continue"),
        (b"Content-Length", b"5"),  # the proxy frames the body itself
        (b"X-Request-Id", b"client-chosen"),  # the proxy sets its own
        (b"accept", b"application/json"),
        (b"X-Custom", b"v1"),
        (b"X-Custom", b"v2"),
    ]
    assert raw_request_headers(raw) == [
        b"accept: application/json\r\n",
        b"X-Custom: v1\r\n",
        b"X-Custom: v2\r\n",
    ]


def test_raw_response_headers_drop_hops_and_the_apis_own_cors_and_decode_as_sent() -> None:
    """raw_response_headers() drops hop-by-hop, Connection-named and the API's Access-Control-*
    headers, keeps repeats and Content-Length, and decodes UTF-8 or else ISO-8859-1."""
    raw = [
        *RAW_HOP_BY_HOP,
        (b"Connection", b"X-Private"),
        (b"X-Private", b"hidden"),
        (b"Access-Control-Allow-Origin", b"*"),
        (b"access-control-allow-credentials", b"true"),
        (b"Content-Length", b"12"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"X-Utf8", "caf\u00e9".encode()),
        (b"X-Latin1", b"caf\xe9"),
    ]
    assert raw_response_headers(raw, str, keep_length=True) == [
        ("Content-Length", "12"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Utf8", "caf\u00e9"),
        ("X-Latin1", "caf\u00e9"),
    ]


def test_raw_response_headers_rewrite_location_and_may_drop_the_length() -> None:
    """raw_response_headers() passes Location (in any case) through the rewrite, leaves other
    headers alone, and drops Content-Length when keep_length is False."""
    raw = [(b"Content-Length", b"12"), (b"location", b"/there"), (b"X-Other", b"/there")]
    assert raw_response_headers(raw, "rewritten:{}".format, keep_length=False) == [
        ("location", "rewritten:/there"),
        ("X-Other", "/there"),
    ]
