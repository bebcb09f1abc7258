"""Which headers cross the proxy, as data: hop-by-hop headers stay on their hop, the
client's credentials never go upstream, everything else passes through untouched."""

from __future__ import annotations

from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["request_headers", "response_headers"]

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
