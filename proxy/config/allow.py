"""Least-privilege routes: which methods and paths a route lets through, as pure data.

A rule is `"METHOD /path/pattern"`: METHOD or `*`, and a pattern on the path below the
route's prefix where `*` is exactly one segment and `**` any number of them (none included).
Paths are matched as sent, case-sensitively, so a path written differently from the rule
(`/BUILD/...`, `/%62uild/...`) is refused rather than let through. Parsed once at start-up;
the request path only calls `RoutePolicy.allows`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["ALLOW_EVERYTHING", "READ_ONLY_METHODS", "AllowRule", "RoutePolicy", "parse_rule"]

READ_ONLY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# RFC 9110 token characters; methods are case-sensitive, and every real one is upper case.
_METHOD: Final = re.compile(r"[A-Z][A-Z0-9!#$%&'*+.^_`|~-]*")
ANY: Final = "*"
ANY_DEPTH: Final = "**"


@dataclass(frozen=True, slots=True)
class AllowRule:
    """One `"METHOD /path/pattern"` rule, split into its method and pattern segments."""

    method: str
    segments: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.method} /{'/'.join(self.segments)}"

    def matches(self, method: str, segments: tuple[str, ...]) -> bool:
        """Whether this rule covers `method` on a path split into `segments` (the path's
        split on '/', without the empty one before its leading '/')."""
        if self.method != ANY and self.method != method:
            return False
        return _matches(self.segments, segments)


def _matches(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    # The common shapes first, segment by segment: no '**', or one at the very end.
    if ANY_DEPTH not in pattern:
        return len(pattern) == len(segments) and _segments_match(pattern, segments)
    if pattern[-1] == ANY_DEPTH and ANY_DEPTH not in pattern[:-1]:
        return len(segments) >= len(pattern) - 1 and _segments_match(pattern[:-1], segments)
    # Dynamic programming over (pattern, path) positions rather than backtracking, so no
    # path, however long, can make a rule with several '**' take more than len x len steps.
    # reachable[j]: the pattern so far can consume exactly the first j segments.
    reachable = [True] + [False] * len(segments)
    for head in pattern:
        if head == ANY_DEPTH:
            for j in range(1, len(reachable)):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [
                reachable[j] and (head == ANY or head == segments[j]) for j in range(len(segments))
            ]
    return reachable[-1]


def _segments_match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    """Each pattern segment against the segment at its place; the callers have checked the
    lengths (for a trailing '**', `segments` may be longer: its rest is not compared)."""
    return all(
        head == ANY or head == segment for head, segment in zip(pattern, segments, strict=False)
    )


def parse_rule(text: str) -> AllowRule:
    """`"GET /build/**"` -> AllowRule; ValueError with what is wrong and an example."""
    example = 'write rules like "GET /build/**" or "POST /distribution/v2/profiles/*/app-versions"'
    parts = text.split()
    if len(parts) != 2:
        raise ValueError(f"rule '{text}' is not 'METHOD /path/pattern'; {example}")
    method, path = parts
    if method != ANY and not _METHOD.fullmatch(method.upper()):
        raise ValueError(f"rule '{text}': '{method}' is not an HTTP method or '*'; {example}")
    if not path.startswith("/"):
        raise ValueError(f"rule '{text}': the path must start with '/'; {example}")
    if "?" in path or "#" in path:
        raise ValueError(f"rule '{text}': rules match the path only, without a query string")
    segments = tuple(path.split("/")[1:])
    for segment in segments:
        if segment in (ANY, ANY_DEPTH):
            continue
        if "*" in segment:
            raise ValueError(
                f"rule '{text}': '*' and '**' must be whole segments ('/*/', not '/v*/')"
            )
        if segment in (".", ".."):
            raise ValueError(f"rule '{text}': '.' and '..' segments never match; remove them")
    return AllowRule(method if method == ANY else method.upper(), segments)


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What one route lets through: its rules (None: every path) and whether it is read-only.
    With both, a request must satisfy both."""

    rules: tuple[AllowRule, ...] | None = None
    read_only: bool = False

    @property
    def restricted(self) -> bool:
        return self.rules is not None or self.read_only

    def allows(self, method: str, path: str) -> bool:
        """Whether `method` on `path` (raw, below the route's prefix, no query) may pass."""
        if self.read_only and method not in READ_ONLY_METHODS:
            return False
        if self.rules is None:
            return True
        segments = tuple(path.split("/")[1:])
        return any(rule.matches(method, segments) for rule in self.rules)

    def describe(self) -> str:
        """The policy in one line, for `check`, error answers and logs."""
        parts = []
        if self.read_only:
            parts.append("read-only (GET, HEAD, OPTIONS)")
        if self.rules is not None:
            parts.append("allow " + ", ".join(f'"{rule}"' for rule in self.rules))
        return "; ".join(parts) or "everything the key may do"


ALLOW_EVERYTHING: Final = RoutePolicy()
