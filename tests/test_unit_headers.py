"""The header filters, case by case: what goes upstream, what comes back."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.policy.headers import (
    raw_request_headers,
    raw_response_headers,
    request_headers,
    response_headers,
)


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


# -- the same rules on raw bytes, as the forwarding client uses them --------------------

RAW_HOP_BY_HOP = [(name.encode(), value.encode()) for name, value in HOP_BY_HOP]


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
