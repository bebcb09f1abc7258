"""The guard's pure checks, case by case: the raw path check and the strict Host parsing."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.guard import _host_name, _path_problem


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost", "localhost"),
        ("LOCALHOST:8787", "localhost"),
        ("  Example.com:8787 ", "example.com"),
        ("127.0.0.1:1", "127.0.0.1"),
        ("[::1]:8787", "::1"),
        ("[::1]", "::1"),
        ("[0:0::1]:8787", "::1"),  # an IPv6 address in its canonical form
        ("app_proxy-1.internal", "app_proxy-1.internal"),
    ],
)
def test_the_host_header_gives_the_lowercase_name_without_port(header: str, name: str) -> None:
    """_host_name() returns the lower-cased name without port for names, IPv4 and bracketed IPv6
    (in canonical form), trimming surrounding spaces."""
    assert _host_name(header) == name


@pytest.mark.parametrize(
    "header",
    [
        "",
        "::1",  # IPv6 must be bracketed
        "[::1",
        "[::1].evil.com",
        "[::1]@evil.com",
        "[localhost]",
        "localhost:x@evil.com",
        "localhost@evil.com",
        "localhost:",
        "localhost:8787:8787",
        "localhost/evil",
        "127.0.0.1 evil.com",
        "caf\udce9",  # a byte that was not UTF-8
    ],
)
def test_anything_but_name_port_or_bracketed_ipv6_port_is_no_host(header: str) -> None:
    """_host_name() returns None for anything but name[:port] or [IPv6][:port]: empty,
    unbracketed IPv6, userinfo, extra colons, paths, spaces, undecodable bytes."""
    assert _host_name(header) is None


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/",
        "/build/v2/profiles",
        "/trailing/",
        "/a%20b/c",
        "/app.v1.2/..x",
        "/.../x",  # three dots are a name
        "/.hidden",
        "/x%2e",
        "/~!$&'()*+,;=:@",  # the last printable characters either side of the bounds
    ],
)
def test_ordinary_paths_pass(path: str) -> None:
    """_path_problem() finds nothing wrong with ordinary paths, including dots inside names,
    three dots, hidden names, encoded spaces and the printable characters at the bounds."""
    assert _path_problem(path) is None


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/a\\b", "backslashes"),
        ("/a b", "spaces"),
        ("/a\x00b", "control characters"),
        ("/a\x1fb", "control characters"),
        ("/a\x7fb", "control characters"),
        ("/a%2Fb", "encoded '/'"),
        ("/a%2fb", "encoded '/'"),
        ("/a%5Cb", "encoded '/'"),
        ("/a%5cb", "encoded '/'"),
        ("/a%00b", "encoded '/'"),
        ("//evil.example/x", "empty path segments"),
        ("/a//b", "empty path segments"),
        ("/.", "'.' and '..'"),
        ("/..", "'.' and '..'"),
        ("/a/./b", "'.' and '..'"),
        ("/a/../b", "'.' and '..'"),
        ("/a/..", "'.' and '..'"),
        ("/a/%2e", "'.' and '..'"),
        ("/a/%2E%2e/b", "'.' and '..'"),
        ("/a/.%2e/b", "'.' and '..'"),
        ("/..;/b", "';parameters'"),
        ("/a/.;x/b", "';parameters'"),
        ("/a/%2e%2e%3b/b", "';parameters'"),
        ("/a/%252e%252e/b", "double percent-encoding"),
        ("/a/%25", "double percent-encoding"),
    ],
)
def test_paths_that_could_mean_something_else_upstream_are_refused_saying_why(
    path: str, reason: str
) -> None:
    """_path_problem() refuses backslashes, spaces, control characters, an encoded slash,
    backslash or NUL, empty segments, dot segments plain, encoded or with ';' parameters, and
    double encoding, saying which."""
    problem = _path_problem(path)
    assert problem is not None and reason in problem, problem


# What servers and file systems trim around a segment: whitespace and control characters,
# ASCII and Unicode ones (NEL, NBSP, the ideographic space).
TRIMMED = st.sampled_from(
    [chr(c) for c in range(0x21)] + ["\x7f", "\x85", "\xa0", "\u2028", "\u3000"]
)


@given(
    before=st.lists(TRIMMED, max_size=3),
    dots=st.sampled_from([".", ".."]),
    after=st.lists(TRIMMED, max_size=3),
    encode_dots=st.booleans(),
)
def test_dots_with_whitespace_or_control_characters_around_them_are_a_dot_segment(
    before: list[str], dots: str, after: list[str], encode_dots: bool
) -> None:
    """Guards the class, not the instances: `..%09`, `%20..`, `.%00` and every mix would
    reach an API that trims the segment as `..`."""
    segment = "".join(before) + dots + "".join(after)
    encoded = quote(segment, safe="" if encode_dots else ".")
    if encode_dots:
        encoded = encoded.replace(".", "%2E")
    problem = _path_problem(f"/x/{encoded}/y")
    assert problem is not None, encoded
    # %00 is refused sooner, as an encoded NUL; every other one as a dot segment.
    assert "'..'" in problem or "NUL" in problem, (encoded, problem)


@pytest.mark.parametrize("path", ["/x/..%09/y", "/x/..%20/y", "/x/%00../y", "/x/%0a./y"])
def test_the_dot_segments_of_the_report_are_refused(path: str) -> None:
    problem = _path_problem(path)
    assert problem is not None
