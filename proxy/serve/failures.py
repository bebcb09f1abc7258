"""What the client gets when the API cannot be reached or answered badly, or when upstream
admission turns a request away: one mapping from each failure to its JSON answer."""

from __future__ import annotations

from aiohttp import web

from ..policy import errors
from ..telemetry.stats import Stats
from ..upstream.connection import UpstreamError, UpstreamTimeout
from ..upstream.pool import Refused

__all__ = ["refusal", "upstream_failed"]


def upstream_failed(api_url: str, failure: Exception) -> web.Response:
    """The answer to a failed exchange with the API at `api_url`: 504 when it was silent
    too long (our client's UpstreamTimeout, or aiohttp's timeouts for WebSockets), 502
    otherwise."""
    if isinstance(failure, (UpstreamTimeout, TimeoutError)):
        return errors.upstream_timeout(api_url)
    reason = failure.reason if isinstance(failure, UpstreamError) else str(failure)
    return errors.upstream_unreachable(api_url, reason)


def refusal(stats: Stats, refused: Refused) -> web.Response:
    """The answer to a request upstream admission turned away, counted."""
    stats.refusal(refused.kind)
    return errors.admission_refused(refused.kind, refused.detail, refused.retry_after)
