"""What the client gets when the API cannot be reached or answered badly, or when upstream
admission turns a request away: one mapping from each failure to its JSON answer."""

from __future__ import annotations

from aiohttp import web

from ..auth.exchange import client_failure
from ..policy import errors
from ..telemetry.stats import Stats
from ..upstream.connection import UpstreamBadResponse, UpstreamError, UpstreamTimeout
from ..upstream.pool import Refused

__all__ = ["refusal", "upstream_failed"]


def upstream_failed(api_url: str, failure: Exception) -> web.Response:
    """The answer to a failed exchange with the API at `api_url`: 504 when it was silent
    too long (our client's UpstreamTimeout, or aiohttp's timeouts for WebSockets), 502
    upstream_bad_response for an answer it will not relay, 502 upstream_unreachable
    otherwise."""
    if isinstance(failure, (UpstreamTimeout, TimeoutError)):
        return errors.upstream_timeout(api_url)
    if isinstance(failure, UpstreamBadResponse):
        return errors.upstream_bad_response(api_url, failure.reason)
    # aiohttp's own text may quote a URL (an egress proxy's password): never relayed.
    reason = failure.reason if isinstance(failure, UpstreamError) else client_failure(failure)
    return errors.upstream_unreachable(api_url, reason)


def refusal(stats: Stats, refused: Refused) -> web.Response:
    """The answer to a request upstream admission turned away, counted."""
    stats.refusal(refused.kind)
    return errors.admission_refused(refused.kind, refused.detail, refused.retry_after)
