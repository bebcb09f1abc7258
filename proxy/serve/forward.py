"""One request to the API and its response back, over the pooled client.

Top to bottom in `Forwarder.forward`: read a small body whole (it can be replayed) or plan
to stream it; take the route's token (waiting at most tokens.wait_timeout); get a
connection (upstream admission: at most pool_timeout, or refused at once); check the token
again, since the wait may have outlasted it; send; on a 401, renew and replay once if the
body was kept; relay the answer, a small one in one write, a large one streamed with
backpressure both ways.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from ..auth.exchange import SessionToken
from ..auth.tokens import TokenUnavailable
from ..policy import errors
from ..policy.headers import raw_request_headers, raw_response_headers
from ..policy.routes import Route
from ..telemetry.facts import Facts
from ..telemetry.stats import Stats
from ..upstream.connection import Connection, Response, UpstreamError, UpstreamTimeout
from ..upstream.pool import Lease, Pool, Refused, flow_of

__all__ = ["SMALL_BODY", "Forwarder", "refusal", "rewrite_location"]

log = logging.getLogger("appcircle_proxy.forward")

# Responses up to this size (by Content-Length) are read whole and sent in one write;
# larger and unknown-length ones stream, and count as long streams.
SMALL_BODY: Final = 64 * 1024
# Safe to send again when a kept-alive connection turns out to have been closed by the API.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
NO_BODY_STATUSES: Final = frozenset({204, 304})
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

Decorate = Callable[[web.BaseRequest, CIMultiDict[str], Facts], None]


class _BodyFailed(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


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
            body, framing, read_ahead = await self._body(request)
        except _BodyFailed as failed:
            return failed.response
        lines = raw_request_headers(request.raw_headers)
        request_line = f"{request.method} {self._base_path}{target} HTTP/1.1\r\n".encode(
            "utf-8", "surrogateescape"
        )
        head_only = request.method == hdrs.METH_HEAD
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
                    framing,
                    b"\r\n",
                )
            )

        try:
            # Without a wait when the route holds a token and a connection is idle (nearly
            # always); otherwise waiting at most tokens.wait_timeout, then pool_timeout.
            token = tokens.to_send() or await tokens.get()
            flow = flow_of(route.name, target)
            lease = self._pool.lease_now(stream=body is None, flow=flow)
            if lease is None:
                lease = await self._pool.acquire(stream=body is None, flow=flow)
                # That wait may have taken long: never send a token past usable.
                token = await tokens.fresh(token)
            started = time.monotonic()
            idempotent = request.method in IDEMPOTENT
            response = await self._exchange(
                request, lease, head(token), body, read_ahead, head_only, retry=idempotent
            )
            # A replay only with another token: a 401 renews at most once per
            # tokens.min_renew_interval; within it, the 401 is the API's answer.
            if response.status == 401 and tokens.invalidate(token):
                if body is not None:
                    # Kept whole, so it can go again with a new token.
                    await self._discard(lease, response)
                    token = await tokens.get()
                    started = time.monotonic()
                    response = await self._exchange(
                        request, lease, head(token), body, read_ahead, head_only, retry=True
                    )
            facts.upstream_seconds = time.monotonic() - started
            facts.upstream_status = response.status
            return await self._relay(request, facts, route, lease, response, head_only, decorate)
        except TokenUnavailable as problem:
            return errors.token_unavailable(route, problem)
        except Refused as refused:
            return refusal(self._stats, refused)
        except UpstreamError as failure:
            return self._failed(failure)
        except _BodyFailed as failed:
            return failed.response
        finally:
            if lease is not None:
                self._pool.release(lease)

    async def _body(self, request: web.BaseRequest) -> tuple[bytes | None, bytes, bytes]:
        """The body, whole when it is small enough to replay (None: stream it), and the
        framing header that goes with it."""
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None and expect.lower() != "100-continue":
            raise _BodyFailed(
                errors.refused(
                    417, "expectation_failed", "only 'Expect: 100-continue' is understood"
                )
            )
        length = request.content_length
        chunked = "chunked" in request.headers.get(hdrs.TRANSFER_ENCODING, "").lower()
        if length is None and not chunked:
            return b"", b"", b""
        if length == 0:
            return b"", b"Content-Length: 0\r\n", b""
        if length is not None and length > self._replay_limit:
            # A stream: refused before 100 Continue invites its body, and before it is read.
            try:
                self._pool.check_stream_room()
            except Refused as refused:
                answer = refusal(self._stats, refused)
                answer.force_close()  # the unread body must not be taken for a request
                raise _BodyFailed(answer) from None
        if expect is not None:
            # Answered here, not upstream: the client may send the body now.
            await request.writer.write(CONTINUE)
        if length is not None and length <= self._replay_limit:
            try:
                async with asyncio.timeout(self.body_timeout):
                    body = await request.content.readexactly(length)
            except TimeoutError:
                raise _BodyFailed(self._too_slow()) from None
            except asyncio.IncompleteReadError:
                raise _BodyFailed(
                    errors.bad_request_body(
                        400, "body_incomplete", "the request body ended before its Content-Length"
                    )
                ) from None
            return body, b"Content-Length: %d\r\n" % length, b""
        if length is not None:
            return None, b"Content-Length: %d\r\n" % length, b""
        # Chunked, length unknown: kept whole (and replayable) if it ends within the limit;
        # otherwise what was read goes first, and the rest streams.
        read_ahead = bytearray()
        try:
            while len(read_ahead) <= self._replay_limit:
                async with asyncio.timeout(self.body_timeout):
                    chunk = await request.content.readany()
                if not chunk:
                    return bytes(read_ahead), b"Content-Length: %d\r\n" % len(read_ahead), b""
                read_ahead += chunk
        except TimeoutError:
            raise _BodyFailed(self._too_slow()) from None
        return None, b"Transfer-Encoding: chunked\r\n", bytes(read_ahead)

    def _too_slow(self) -> web.Response:
        return errors.bad_request_body(
            408,
            "body_timeout",
            f"the request body made no progress for {self.body_timeout:g} s "
            "(server.body_timeout); send it faster, or raise the limit",
        )

    async def _exchange(
        self,
        request: web.BaseRequest,
        lease: Lease,
        head: bytes,
        body: bytes | None,
        read_ahead: bytes,
        head_only: bool,
        *,
        retry: bool,
    ) -> Response:
        """Send the request and wait for the response head. A kept-alive connection that
        the API had closed is replaced once, when the request can be sent again."""
        while True:
            if lease.connection.closed:
                # The API closed it while it sat idle (or while we waited for a token).
                lease.connection = await self._pool.reconnect(lease)
            connection = lease.connection
            try:
                if body is not None:
                    connection.send(head, body, head_only=head_only)
                    connection.body_sent()
                    return await connection.response()
                return await self._stream_up(request, connection, head, read_ahead, head_only)
            except UpstreamError as failure:
                if not (failure.replayable and retry and body is not None):
                    raise
                retry = False
                lease.connection = await self._pool.reconnect(lease)

    async def _stream_up(
        self,
        request: web.BaseRequest,
        connection: Connection,
        head: bytes,
        read_ahead: bytes,
        head_only: bool,
    ) -> Response:
        """Send a streamed body while waiting for the answer, which may come first."""
        connection.send(head, head_only=head_only)
        chunked = request.content_length is None
        upload = asyncio.ensure_future(self._upload(request, connection, chunked, read_ahead))
        upload.add_done_callback(_retrieve)
        try:
            response = await connection.response()
        except UpstreamError:
            if upload.done() and not upload.cancelled():
                failure = upload.exception()
                if isinstance(failure, _BodyFailed):
                    raise failure from None
                if failure is not None and not isinstance(failure, UpstreamError):
                    raise _BodyFailed(
                        errors.bad_request_body(
                            400, "body_incomplete", "the request body ended before it was complete"
                        )
                    ) from None
            raise
        finally:
            if not upload.done():
                upload.cancel()
                connection.forbid_reuse()
        return response

    async def _upload(
        self, request: web.BaseRequest, connection: Connection, chunked: bool, read_ahead: bytes
    ) -> None:
        content = request.content
        try:
            while True:
                if read_ahead:
                    chunk, read_ahead = read_ahead, b""
                else:
                    try:
                        async with asyncio.timeout(self.body_timeout):
                            chunk = await content.readany()
                    except TimeoutError:
                        raise _BodyFailed(self._too_slow()) from None
                    if not chunk:
                        break
                if chunked:
                    await connection.send_body(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    await connection.send_body(chunk)
            if chunked:
                await connection.send_body(b"0\r\n\r\n")
            connection.body_sent()
        except (asyncio.CancelledError, UpstreamError):
            raise  # cancelled by the handler, or the connection failed: the handler knows
        except BaseException:
            # Too slow, or the client's connection broke mid-body: the API must not wait on.
            connection.abort(UpstreamError("the client's request body failed"))
            raise

    async def _discard(self, lease: Lease, response: Response) -> None:
        """Drop a refused answer's body, keeping the connection when that is cheap."""
        connection = lease.connection
        length = response.content_length
        if length is not None and length <= SMALL_BODY:
            await connection.read_all()
        if not connection.reusable:
            lease.connection = await self._pool.reconnect(lease)
        else:
            connection.finish()

    async def _relay(
        self,
        request: web.BaseRequest,
        facts: Facts,
        route: Route,
        lease: Lease,
        response: Response,
        head_only: bool,
        decorate: Decorate,
    ) -> web.StreamResponse:
        def location(value: str) -> str:
            return rewrite_location(value, self.api_url, route.prefix, request.scheme, request.host)

        connection = lease.connection
        length = response.content_length
        no_body = head_only or response.status in NO_BODY_STATUSES
        whole = not no_body and length is not None and length <= SMALL_BODY
        # A body sent whole gets its length from aiohttp; the API's must not disagree.
        headers = raw_response_headers(response.headers, location, keep_length=not whole)
        if no_body:
            empty = web.StreamResponse(status=response.status, reason=response.reason)
            empty.headers.extend(headers)
            decorate(request, empty.headers, facts)
            await empty.prepare(request)
            await empty.write_eof()
            return empty
        if whole:
            # Usually all here already: a small answer tends to come in one read.
            body = connection.body_if_complete()
            if body is None:
                try:
                    body = await connection.read_all()
                except UpstreamError as failure:
                    return self._failed(failure)
            # Decorated by the handler, as its own answers are, before aiohttp sends it.
            return web.Response(
                status=response.status, reason=response.reason, headers=headers, body=body
            )
        if not self._pool.promote(lease) and request.method in IDEMPOTENT:
            # Safe to refuse: the request may be sent again. One the API may have acted on
            # (a POST) is relayed on its call slot instead, whatever the stream budget says.
            streams = self._pool.streams.limit
            return refusal(
                self._stats,
                Refused(
                    "streams_full",
                    f"all {streams} long streams to the API are in use "
                    "(appcircle.max_streams); retry shortly, or raise the limit",
                ),
            )
        streamed = web.StreamResponse(status=response.status, reason=response.reason)
        streamed.headers.extend(headers)
        decorate(request, streamed.headers, facts)
        try:
            await streamed.prepare(request)
            while True:
                try:
                    chunk = await connection.read()
                except UpstreamError as failure:
                    # The body is cut short. Closing the client's connection is the only
                    # way to tell it so; ending the body cleanly would pass off a truncated
                    # file as whole.
                    log.warning(
                        "upstream failed mid-response for %s on route %s (%s); closing the "
                        "client connection",
                        request.method,
                        route.name,
                        failure.reason,
                    )
                    return _cut(request, streamed)
                if not chunk:
                    break
                facts.bytes_out += len(chunk)
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await streamed.write(chunk)
                except TimeoutError:
                    # A client that takes nothing for this long would hold a stream slot
                    # and an API connection for ever.
                    log.info(
                        "client read nothing for %g s (server.send_timeout) during %s on "
                        "route %s; closing its connection",
                        self.send_timeout,
                        request.method,
                        route.name,
                    )
                    return _cut(request, streamed)
            await streamed.write_eof()
        except ConnectionResetError:
            log.debug("client went away during %s on route %s", request.method, route.name)
        return streamed

    def _failed(self, failure: UpstreamError) -> web.Response:
        if isinstance(failure, UpstreamTimeout):
            return errors.upstream_timeout(self.api_url)
        return errors.upstream_unreachable(self.api_url, failure.reason)


def rewrite_location(location: str, api_url: str, prefix: str, scheme: str, host: str) -> str:
    """Point a redirect at the API (under `api_url`'s path) back through the proxy, at
    `scheme://host` and the route's `prefix`; any other Location is returned as it is."""
    api = URL(api_url)
    # A scheme-relative reference ('//host/path') is resolved against the API it came from.
    absolute = f"{api.scheme}:{location}" if location.startswith("//") else location
    try:
        target = URL(absolute, encoded=True)
        elsewhere = target.is_absolute() and target.origin() != api.origin()
    except ValueError:
        return location  # not a URL we can read: the client gets it as the API sent it
    if elsewhere or not (target.is_absolute() or location.startswith("/")):
        return location
    base = api.raw_path.rstrip("/")
    path = target.raw_path
    if base and not (path == base or path.startswith(base + "/")):
        return location
    below = path[len(base) :] or "/"
    rewritten = f"{scheme}://{host}{'' if prefix == '/' else prefix}{below}"
    if target.raw_query_string:
        rewritten += "?" + target.raw_query_string
    if target.raw_fragment:
        rewritten += "#" + target.raw_fragment
    return rewritten


def refusal(stats: Stats, refused: Refused) -> web.Response:
    """The answer to a request upstream admission turned away, counted."""
    stats.refusal(refused.kind)
    return errors.admission_refused(refused.kind, refused.detail, refused.retry_after)


def _cut(request: web.BaseRequest, response: web.StreamResponse) -> web.StreamResponse:
    """End a streamed answer by closing the client's connection: the only way to tell the
    client the body is incomplete (ending it cleanly would pass off a truncated body)."""
    if request.transport is not None:
        request.transport.close()
    return response


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark an upload's failure as seen: the handler reports it, or no longer cares."""
    if not task.cancelled():
        task.exception()
