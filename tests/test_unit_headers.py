"""The header filters, case by case: what goes upstream, what comes back."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import request_headers, response_headers


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
    incoming = headers(*HOP_BY_HOP, ("X-Kept", "1"))
    assert list(request_headers(incoming).items()) == [("X-Kept", "1")]
    assert list(response_headers(incoming).items()) == [("X-Kept", "1")]


def test_headers_named_by_connection_are_dropped_whatever_their_case_and_spacing() -> None:
    incoming = headers(
        ("Connection", " X-One ,, x-TWO"),
        ("Connection", "X-Three"),
        ("X-One", "a"),
        ("X-Two", "b"),
        ("x-three", "c"),
        ("X-Four", "d"),
    )
    assert list(request_headers(incoming).items()) == [("X-Four", "d")]
    assert list(response_headers(incoming).items()) == [("X-Four", "d")]


def test_host_authorization_and_expect_are_the_proxys_to_set_on_the_way_up() -> None:
    incoming = headers(
        ("Host", "localhost:8787"),
        ("Authorization", "Bearer client-supplied"),
        ("Expect", "100-continue"),
        ("Accept", "application/json"),
    )
    assert list(request_headers(incoming).items()) == [("Accept", "application/json")]


def test_the_answer_keeps_what_only_the_way_up_drops() -> None:
    incoming = headers(
        ("Authorization", "x"), ("Expect", "y"), ("Host", "z"), ("WWW-Authenticate", "Bearer")
    )
    assert list(response_headers(incoming).items()) == list(incoming.items())


def test_everything_else_passes_in_order_with_repeats_and_the_senders_spelling() -> None:
    incoming = headers(
        ("set-cookie", "a=1"),
        ("X-Custom", "v"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
        ("User-Agent", "appcircle-cli/2.0"),
    )
    assert list(request_headers(incoming).items()) == list(incoming.items())
    assert list(response_headers(incoming).items()) == list(incoming.items())
