"""Which headers cross the proxy, as data: hop-by-hop headers stay on their hop, the
client's credentials never go upstream, everything else passes through untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = [
    "raw_request_headers",
    "raw_response_headers",
    "request_headers",
    "response_headers",
    "rewrite_location",
]

# RFC 9110 section 7.6.1, plus the Proxy-* family and the pre-standard Proxy-Connection.
HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Host is the upstream's; Authorization is ours to set; Expect is answered by our server.
REQUEST_ONLY_DROPPED: Final = frozenset({"host", "authorization", "expect"})


def _connection_listed(headers: CIMultiDictProxy[str]) -> set[str]:
    return {
        name.strip().lower()
        for value in headers.getall("Connection", [])
        for name in value.split(",")
        if name.strip()
    }


def _filtered(headers: CIMultiDictProxy[str], also_dropped: frozenset[str]) -> CIMultiDict[str]:
    dropped = HOP_BY_HOP | also_dropped | _connection_listed(headers)
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in dropped and not name.lower().startswith("proxy-")
    )


def request_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers as they go upstream, before the proxy adds Authorization."""
    return _filtered(incoming, REQUEST_ONLY_DROPPED)


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's headers as they go back to the client (Location not yet rewritten)."""
    return _filtered(incoming, frozenset())


# The same rules on raw bytes, for the forwarding client. The proxy sets the framing
# (Content-Length / Transfer-Encoding) and the request id itself.
_RAW_REQUEST_DROPPED: Final = frozenset(
    name.encode() for name in HOP_BY_HOP | REQUEST_ONLY_DROPPED | {"content-length", "x-request-id"}
)
_RAW_RESPONSE_DROPPED: Final = frozenset(name.encode() for name in HOP_BY_HOP)


def _raw_connection_listed(raw: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    listed: set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    return frozenset(listed)


def raw_request_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """The client's header lines (b"Name: value\\r\\n") as they go upstream."""
    raw = tuple(raw)
    listed = _raw_connection_listed(raw)
    lines = []
    for name, value in raw:
        lowered = name.lower()
        if lowered in _RAW_REQUEST_DROPPED or lowered in listed or lowered.startswith(b"proxy-"):
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    return lines


def raw_response_headers(
    raw: list[tuple[bytes, bytes]],
    location: Callable[[str], str],
    *,
    keep_length: bool,
) -> list[tuple[str, str]]:
    """The API's headers as they go back to the client: hop-by-hop headers and the API's own
    CORS headers dropped (only the proxy's CORS policy applies), the first Location passed
    through `location` and any other dropped (clients refuse two), and Content-Length
    dropped unless `keep_length` (a body sent whole gets its length from the server)."""
    listed = _raw_connection_listed(raw)
    headers = []
    located = False
    for name, value in raw:
        lowered = name.lower()
        if (
            lowered in _RAW_RESPONSE_DROPPED
            or lowered in listed
            or lowered.startswith((b"proxy-", b"access-control-"))
            or (lowered == b"content-length" and not keep_length)
        ):
            continue
        text = _text(value)
        if lowered == b"location":
            if located:
                continue
            located = True
            text = location(text)
        headers.append((name.decode("latin-1"), text))
    return headers


def rewrite_location(location: str, api_url: str, prefix: str, scheme: str, host: str) -> str:
    """Point a redirect at the API (under `api_url`'s path) back through the proxy, at
    `scheme://host` and the route's `prefix`; any other Location is returned as it is."""
    api = URL(api_url)
    # A scheme-relative reference ('//host/path') is resolved against the API it came from.
    absolute = f"{api.scheme}:{location}" if location.startswith("//") else location
    try:
        target = URL(absolute, encoded=True)
        elsewhere = target.is_absolute() and target.origin() != api.origin()
    except ValueError:
        return location  # not a URL we can read: the client gets it as the API sent it
    if elsewhere or not (target.is_absolute() or location.startswith("/")):
        return location
    base = api.raw_path.rstrip("/")
    path = target.raw_path
    if base and not (path == base or path.startswith(base + "/")):
        return location
    below = path[len(base) :] or "/"
    rewritten = f"{scheme}://{host}{'' if prefix == '/' else prefix}{below}"
    if target.raw_query_string:
        rewritten += "?" + target.raw_query_string
    if target.raw_fragment:
        rewritten += "#" + target.raw_fragment
    return rewritten


def _text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")
