"""Shutdown as clients see it: once draining begins, every answer carries
`Connection: close`, so keep-alive clients reconnect elsewhere instead of being cut."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import hdrs
from multidict import CIMultiDict

__all__ = ["Drain"]


@dataclass(slots=True)
class Drain:
    """Set by the server when it stops accepting; read by the request path."""

    draining: bool = False

    def mark(self, headers: CIMultiDict[str]) -> None:
        """For every answer's headers before they are sent. The server has already told
        aiohttp to close each connection after its current answer; this says so."""
        if self.draining:
            headers[hdrs.CONNECTION] = "close"
