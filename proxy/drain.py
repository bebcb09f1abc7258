"""Shutdown as clients see it: once draining begins, every answer carries
`Connection: close`, so keep-alive clients reconnect elsewhere instead of being cut."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import hdrs, web

__all__ = ["DRAIN", "Drain"]


@dataclass(slots=True)
class Drain:
    """Set by the server when it stops accepting; read by the request path."""

    draining: bool = False

    def mark(self, response: web.StreamResponse) -> None:
        """Call before `response.prepare()`: while draining, the answer closes its connection."""
        if self.draining:
            response.force_close()
            # aiohttp has computed the headers by the time on_response_prepare runs.
            response.headers[hdrs.CONNECTION] = "close"

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        self.mark(response)


DRAIN = web.AppKey("drain", Drain)
