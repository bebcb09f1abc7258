"""One call to the API on a leased connection: send the request, replay it once with a
renewed token after a 401, and send it again on a new connection when a kept-alive one
turns out to have been closed by the API, but only when `may_send_again` says so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

from aiohttp import web

from ..auth.exchange import SessionToken
from ..auth.tokens import TokenSource
from ..upstream.connection import Connection, Response, UpstreamError
from ..upstream.pool import Lease, Pool
from .body import Body, BodyFailed, incomplete, upload

__all__ = ["IDEMPOTENT", "Caller", "may_send_again"]

# Safe to send again when a kept-alive connection turns out to have been closed by the API.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# A refused answer up to this size is read to keep its connection; a larger one costs a
# new connection instead.
_DISCARD_LIMIT: Final = 64 * 1024


def may_send_again(method: str, body: Body, failure: UpstreamError, *, resent: bool) -> bool:
    """The one rule for sending a request again after its connection failed: the method is
    idempotent, the body was kept whole, the API sent no byte of an answer (it had closed a
    kept-alive connection), and this was not already a second sending (a retry, or the
    replay after a 401, each of which goes at most once)."""
    return failure.replayable and method in IDEMPOTENT and body.kept is not None and not resent


class Caller:
    """Sends requests through `pool`; built once per process."""

    def __init__(self, pool: Pool, body_timeout: float) -> None:
        self._pool = pool
        self._body_timeout = body_timeout

    async def call(
        self,
        request: web.BaseRequest,
        lease: Lease,
        tokens: TokenSource,
        token: SessionToken,
        head: Callable[[SessionToken], bytes],
        body: Body,
    ) -> tuple[Response, float]:
        """The API's answer (its head) and when the request that got it was sent."""
        started = time.monotonic()
        response = await self._send(request, lease, head(token), body, resent=False)
        # A replay only with another token: a 401 renews at most once per
        # tokens.min_renew_interval; within it, the 401 is the API's answer.
        if response.status == 401 and tokens.invalidate(token) and body.kept is not None:
            # Kept whole, so it can go again with a new token.
            await self._discard(lease, response)
            token = await tokens.get()
            started = time.monotonic()
            response = await self._send(request, lease, head(token), body, resent=True)
        return response, started

    async def _send(
        self, request: web.BaseRequest, lease: Lease, head: bytes, body: Body, *, resent: bool
    ) -> Response:
        """Send the request and wait for the response head."""
        head_only = request.method == "HEAD"
        while True:
            if lease.connection.closed:
                # The API closed it while it sat idle (or while we waited for a token).
                lease.connection = await self._pool.reconnect(lease)
            connection = lease.connection
            try:
                if body.kept is not None:
                    connection.send(head, body.kept, head_only=head_only)
                    connection.body_sent()
                    return await connection.response()
                return await self._stream_up(request, connection, head, body, head_only)
            except UpstreamError as failure:
                if not may_send_again(request.method, body, failure, resent=resent):
                    raise
                resent = True
                lease.connection = await self._pool.reconnect(lease)

    async def _stream_up(
        self,
        request: web.BaseRequest,
        connection: Connection,
        head: bytes,
        body: Body,
        head_only: bool,
    ) -> Response:
        """Send a streamed body while waiting for the answer, which may come first."""
        connection.send(head, head_only=head_only)
        sending = asyncio.ensure_future(
            upload(request, connection, body.read_ahead, self._body_timeout)
        )
        sending.add_done_callback(_retrieve)
        try:
            response = await connection.response()
        except UpstreamError:
            if sending.done() and not sending.cancelled():
                failure = sending.exception()
                if isinstance(failure, BodyFailed):
                    raise failure from None
                if failure is not None and not isinstance(failure, UpstreamError):
                    raise BodyFailed(incomplete()) from None
            raise
        finally:
            if not sending.done():
                sending.cancel()
                connection.forbid_reuse()
        return response

    async def _discard(self, lease: Lease, response: Response) -> None:
        """Drop a refused answer's body, keeping the connection when that is cheap."""
        connection = lease.connection
        length = response.content_length
        if length is not None and length <= _DISCARD_LIMIT:
            await connection.read_all()
        if not connection.reusable:
            lease.connection = await self._pool.reconnect(lease)
        else:
            connection.finish()


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark an upload's failure as seen: the handler reports it, or no longer cares."""
    if not task.cancelled():
        task.exception()
