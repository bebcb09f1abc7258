"""One request to the API and its response back, over the pooled client.

Top to bottom in `Forwarder.forward`: read a small body whole (it can be replayed) or plan
to stream it (body.py); take the route's token (waiting at most tokens.wait_timeout); get a
connection (upstream admission: at most pool_timeout, or refused at once); check the token
again, since the wait may have outlasted it; send, with a replay after a 401 (call.py);
relay the answer (relay.py).
"""

from __future__ import annotations

import time

from aiohttp import web
from yarl import URL

from ..auth.exchange import SessionToken
from ..auth.tokens import TokenUnavailable
from ..policy import errors
from ..policy.headers import raw_request_headers
from ..policy.routes import Route
from ..telemetry.facts import Facts
from ..telemetry.stats import Stats
from ..upstream.connection import UpstreamError
from ..upstream.pool import Lease, Pool, Refused, flow_of
from .body import BodyFailed, read_body
from .call import Caller
from .failures import refusal, upstream_failed
from .relay import Decorate, Relay

__all__ = ["Forwarder"]


class Forwarder:
    """Sends requests to the API host through `pool`; built once per process."""

    def __init__(
        self,
        api_url: str,
        pool: Pool,
        stats: Stats,
        *,
        replay_limit: int,
        body_timeout: float,
        send_timeout: float,
    ) -> None:
        api = URL(api_url)
        self.api_url = api_url
        self._host_line = f"Host: {api.raw_authority}\r\n".encode()
        self._base_path = api.raw_path.rstrip("/")
        self._pool = pool
        self._stats = stats
        self._replay_limit = replay_limit
        self.body_timeout = body_timeout
        # Also the deadline for a WebSocket peer that takes nothing (see websocket.py).
        self.send_timeout = send_timeout
        self._caller = Caller(pool, body_timeout)
        self._relay = Relay(api_url, pool, stats, send_timeout)

    async def forward(
        self,
        request: web.BaseRequest,
        facts: Facts,
        route: Route,
        target: str,
        decorate: Decorate,
    ) -> web.StreamResponse:
        """`target` is the path below the route's prefix, with the query."""
        try:
            body = await read_body(
                request, self._replay_limit, self.body_timeout, self._no_stream_room
            )
        except BodyFailed as failed:
            return failed.response
        lines = raw_request_headers(request.raw_headers)
        request_line = f"{request.method} {self._base_path}{target} HTTP/1.1\r\n".encode(
            "utf-8", "surrogateescape"
        )
        tokens = route.tokens
        lease: Lease | None = None

        def head(token: SessionToken) -> bytes:
            return b"".join(
                (
                    request_line,
                    self._host_line,
                    *lines,
                    b"Authorization: Bearer ",
                    token.value.encode(),
                    b"\r\nX-Request-Id: ",
                    facts.request_id.encode(),
                    b"\r\n",
                    body.framing,
                    b"\r\n",
                )
            )

        try:
            # Without a wait when the route holds a token and a connection is idle (nearly
            # always); otherwise waiting at most tokens.wait_timeout, then pool_timeout.
            token = tokens.to_send() or await tokens.get()
            stream = body.kept is None
            flow = flow_of(route.name, target)
            lease = self._pool.lease_now(stream=stream, flow=flow)
            if lease is None:
                lease = await self._pool.acquire(stream=stream, flow=flow)
                # That wait may have taken long: never send a token past usable.
                token = await tokens.fresh(token)
            response, started = await self._caller.call(request, lease, tokens, token, head, body)
            facts.upstream_seconds = time.monotonic() - started
            facts.upstream_status = response.status
            return await self._relay.relay(request, facts, route, lease, response, decorate)
        except TokenUnavailable as problem:
            return errors.token_unavailable(route, problem)
        except Refused as refused:
            return refusal(self._stats, refused)
        except UpstreamError as failure:
            return upstream_failed(self.api_url, failure)
        except BodyFailed as failed:
            return failed.response
        finally:
            if lease is not None:
                self._pool.release(lease)

    def _no_stream_room(self) -> web.Response | None:
        """Before a body too large to keep is invited (100 Continue) or read: the refusal,
        at once, when every stream slot is taken; None when one is free."""
        try:
            self._pool.check_stream_room()
        except Refused as refused:
            answer = refusal(self._stats, refused)
            answer.force_close()  # the unread body must not be taken for a request
            return answer
        return None
