"""What a request leaves behind for the access log and the statistics: owned here, written
by the request handler and the error answers, read by the access logger."""

from __future__ import annotations

from typing import Final

from aiohttp import web

__all__ = ["ERROR_CODE", "FACTS", "NO_CLIENT", "Facts"]

# A request that named no client (no client token is configured, or a health probe).
NO_CLIENT: Final = "-"


class Facts:
    """One request's facts; upstream fields stay None when nothing went upstream."""

    __slots__ = (
        "bytes_out",
        "client",
        "request_id",
        "route",
        "upstream_seconds",
        "upstream_status",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.route = "-"
        # The client its token named (server.client_token is "default").
        self.client = NO_CLIENT
        self.upstream_status: int | None = None
        self.upstream_seconds: float | None = None
        # Body bytes of a streamed answer (a whole one is measured from its body).
        self.bytes_out = 0


FACTS = web.RequestKey("facts", Facts)
# The stable error code of one of the proxy's own answers (errors.py sets it).
ERROR_CODE = web.ResponseKey("error_code", str)
