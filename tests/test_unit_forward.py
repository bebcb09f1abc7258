"""Pure pieces of the forwarding path: the Location rewrite (a redirect at the API comes
back through the proxy) and the rule for sending a request again."""

from __future__ import annotations

import pytest

from proxy.policy.headers import rewrite_location
from proxy.serve.body import Body
from proxy.serve.call import may_send_again
from proxy.upstream.connection import UpstreamError

API = "https://api.appcircle.io"
PROXY = "http://localhost:8787"


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
