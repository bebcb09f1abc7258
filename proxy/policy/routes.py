"""Which route serves a request path: the longest matching prefix, on segment boundaries."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..auth.credentials import Credential
from ..auth.tokens import TokenSource
from ..config.allow import ALLOW_EVERYTHING, RoutePolicy

__all__ = ["Route", "RouteTable"]


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    prefix: str
    credential: Credential
    sub_organization: str | None
    tokens: TokenSource = field(repr=False)
    policy: RoutePolicy = ALLOW_EVERYTHING
    # None: the API, through the pool. Otherwise another Appcircle host (the MCP server, a
    # self-hosted service), relayed by serve.mcp.
    upstream_url: str | None = None
    # Glob patterns of the MCP tools this route lets agents call (None: every tool).
    mcp_tools: tuple[str, ...] | None = None

    def allows(self, method: str, path: str) -> bool:
        """Whether this route's allow rules and read_only let `method` on `path` (below the
        prefix, no query) through."""
        return self.policy.allows(method, path)

    def strip(self, path: str) -> str | None:
        """The path below this route's prefix, or None if the path is not under it."""
        if self.prefix == "/":
            return path
        if path == self.prefix:
            return "/"
        if path.startswith(self.prefix + "/"):
            return path[len(self.prefix) :]
        return None


class RouteTable:
    def __init__(self, routes: list[Route]) -> None:
        # Longest prefix first, so the first match is the most specific one.
        self._routes = sorted(routes, key=lambda route: len(route.prefix), reverse=True)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    @property
    def prefixes(self) -> list[str]:
        return sorted(route.prefix for route in self._routes)

    def match(self, path: str) -> tuple[Route, str] | None:
        """The route for a raw path (no query) and the path to send upstream."""
        for route in self._routes:
            rest = route.strip(path)
            if rest is not None:
                return route, rest
        return None

    def by_name(self, name: str) -> Route | None:
        return next((route for route in self._routes if route.name == name), None)
