"""Routes to an Appcircle host other than the API, above all Appcircle's MCP server for AI
agents (`routes.NAME.upstream = "mcp"`), relayed with aiohttp's client and the route's
renewed session token, so an agent holds no credential and outlives any one token.

MCP's streamable HTTP transport passes through as it is: POST answered with JSON or with
an SSE stream, GET SSE streams, DELETE, and the `Mcp-Session-Id` header both ways. With
`routes.NAME.mcp_tools` (glob patterns), a JSON-RPC `tools/call` naming any other tool is
answered here with a JSON-RPC error and never reaches the MCP host, and `tools/list`
answers show only the allowed tools.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from ..auth.exchange import SessionToken, client_failure
from ..auth.tokens import TokenUnavailable
from ..policy import errors
from ..policy.headers import request_headers, response_headers, rewrite_location
from ..policy.routes import Route
from ..telemetry.facts import Facts
from .relay import Decorate

__all__ = ["MAX_MESSAGE_BYTES", "Relay", "allowed_tool", "filter_tools", "tool_refusal"]

log = logging.getLogger("appcircle_proxy.mcp")

# A request body up to this size is read whole (checked for tool calls, replayable after a
# 401); a larger one streams, and on a route with mcp_tools is refused (413).
MAX_MESSAGE_BYTES: Final = 1024 * 1024
# A JSON answer read whole to filter a tools/list result; larger ones are refused (502).
MAX_FILTERED_ANSWER: Final = 16 * 1024 * 1024
# JSON-RPC "Invalid params": what MCP servers answer for an unknown tool.
INVALID_PARAMS: Final = -32602
SSE_EVENT_END: Final = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# aiohttp adds none of these unless the client sent them.
NO_AUTO_HEADERS: Final = (
    hdrs.ACCEPT,
    hdrs.ACCEPT_ENCODING,
    hdrs.USER_AGENT,
    hdrs.CONTENT_TYPE,
)


def allowed_tool(patterns: tuple[str, ...], name: object) -> bool:
    return isinstance(name, str) and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def tool_refusal(route: Route, body: bytes) -> bytes | None:
    """The JSON-RPC answer refusing the tool calls in `body` that `route.mcp_tools` does not
    allow (the whole batch, if one of a batch is refused), or None when all may pass."""
    patterns = route.mcp_tools
    if patterns is None:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None  # not JSON-RPC: the MCP host answers it
    messages = document if isinstance(document, list) else [document]
    refused = [
        message
        for message in messages
        if isinstance(message, dict)
        and message.get("method") == "tools/call"
        and not allowed_tool(patterns, (message.get("params") or {}).get("name"))
    ]
    if not refused:
        return None

    def error(message: Any, why: str) -> dict[str, Any]:
        return {
            "jsonrpc": "2.0",
            "id": message.get("id"),
            "error": {"code": INVALID_PARAMS, "message": why},
        }

    allowed = ", ".join(patterns)

    def why(message: Any) -> str:
        name = (message.get("params") or {}).get("name")
        return (
            f"tool '{name}' is not allowed through this proxy route "
            f"(routes.{route.name}.mcp_tools: {allowed})"
        )

    if not isinstance(document, list):
        return json.dumps(error(document, why(document))).encode()
    answers = [
        error(
            message,
            why(message)
            if message in refused
            else "not sent: another call in this batch names a tool that is not allowed",
        )
        for message in messages
        if isinstance(message, dict) and "id" in message and "method" in message
    ]
    return json.dumps(answers).encode()


def filter_tools(patterns: tuple[str, ...], message: Any) -> Any:
    """A JSON-RPC message with any tools/list result narrowed to the allowed tools; any
    other message as it is."""
    if isinstance(message, list):
        return [filter_tools(patterns, item) for item in message]
    result = message.get("result") if isinstance(message, dict) else None
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return message
    tools = [
        tool
        for tool in result["tools"]
        if isinstance(tool, dict) and allowed_tool(patterns, tool.get("name"))
    ]
    return {**message, "result": {**result, "tools": tools}}


def _filter_event(patterns: tuple[str, ...], event: bytes) -> bytes:
    """One SSE event (without its blank line) with a tools/list result in its data filtered."""
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    if not data:
        return event
    try:
        message = json.loads(b"\n".join(data))
    except ValueError:
        return event
    filtered = filter_tools(patterns, message)
    if filtered is message:
        return event
    kept = [line for line in lines if not line.startswith(b"data:")]
    return b"\n".join([*kept, b"data: " + json.dumps(filtered).encode()])


async def _sse_filtered(
    patterns: tuple[str, ...], chunks: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    """An SSE stream with each event passed on as soon as it is complete, filtered."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        out = bytearray()
        while (end := SSE_EVENT_END.search(pending)) is not None:
            out += (
                _filter_event(patterns, pending[: end.start()]) + pending[end.start() : end.end()]
            )
            pending = pending[end.end() :]
        if out:
            yield bytes(out)
    if pending:
        yield pending


async def _chunks(reply: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    while chunk := await reply.content.readany():
        yield chunk


@dataclass(frozen=True, slots=True)
class Relay:
    """Relays requests on routes whose upstream is not the API, over `session`."""

    session: aiohttp.ClientSession = field(repr=False)
    send_timeout: float

    async def answer(
        self,
        request: web.BaseRequest,
        facts: Facts,
        route: Route,
        target: str,
        decorate: Decorate,
    ) -> web.StreamResponse:
        """`target` is the path below the route's prefix, with the query."""
        assert route.upstream_url is not None
        url = _upstream_url(route.upstream_url, target)
        headers = request_headers(request.headers)
        if route.mcp_tools is not None:
            # Tool lists are read to be filtered: they must come unencoded.
            headers[hdrs.ACCEPT_ENCODING] = "identity"
        length = request.content_length
        chunked = "chunked" in request.headers.get(hdrs.TRANSFER_ENCODING, "").lower()
        body: bytes | None = b""
        if (length is not None and length > MAX_MESSAGE_BYTES) or (chunked and length is None):
            if route.mcp_tools is not None:
                return errors.refused(
                    413,
                    "mcp_message_too_large",
                    f"on a route with mcp_tools, a request body is at most {MAX_MESSAGE_BYTES} "
                    "bytes with a Content-Length, so its tool calls can be checked",
                )
            body = None  # streamed, not replayable
        elif length:
            body = await request.content.readexactly(length)
            refusal = tool_refusal(route, body)
            if refusal is not None:
                log.info("refused a tools/call on route %s (mcp_tools)", route.name)
                response = web.Response(body=refusal, content_type="application/json")
                response.headers[hdrs.CACHE_CONTROL] = "no-store"
                return response
        try:
            token = route.tokens.to_send() or await route.tokens.get()
            reply = await self._send(request, url, headers, body, token)
            if reply.status == 401 and body is not None and route.tokens.invalidate(token):
                reply.release()
                reply = await self._send(request, url, headers, body, await route.tokens.get())
        except TokenUnavailable as problem:
            return errors.token_unavailable(route, problem)
        except TimeoutError:
            return errors.upstream_timeout(route.upstream_url)
        except aiohttp.ClientError as err:
            return errors.upstream_unreachable(route.upstream_url, client_failure(err))
        facts.upstream_status = reply.status
        async with reply:
            return await self._relay(request, facts, route, reply, decorate)

    async def _send(
        self,
        request: web.BaseRequest,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | None,
        token: SessionToken,
    ) -> aiohttp.ClientResponse:
        headers = CIMultiDict(headers)
        headers[hdrs.AUTHORIZATION] = f"Bearer {token.value}"
        return await self.session.request(
            request.method,
            url,
            headers=headers,
            # None: no body (aiohttp then sends no Content-Length on a GET or DELETE).
            data=request.content if body is None else (body or None),
            allow_redirects=False,
            skip_auto_headers=NO_AUTO_HEADERS,
        )

    async def _relay(
        self,
        request: web.BaseRequest,
        facts: Facts,
        route: Route,
        reply: aiohttp.ClientResponse,
        decorate: Decorate,
    ) -> web.StreamResponse:
        assert route.upstream_url is not None
        upstream = route.upstream_url
        headers = response_headers(reply.headers)
        headers.popall(hdrs.CONTENT_LENGTH, None)
        if (location := headers.get(hdrs.LOCATION)) is not None:
            headers[hdrs.LOCATION] = rewrite_location(
                location, upstream, route.prefix, request.scheme, request.host
            )
        patterns = route.mcp_tools
        chunks = _chunks(reply)
        if patterns is not None and reply.content_type == "application/json":
            body = bytearray()
            async for chunk in chunks:
                body += chunk
                if len(body) > MAX_FILTERED_ANSWER:
                    return errors.upstream_unreachable(
                        upstream, f"a JSON answer larger than {MAX_FILTERED_ANSWER} bytes"
                    )
            try:
                filtered = json.dumps(filter_tools(patterns, json.loads(body))).encode()
            except ValueError:
                filtered = bytes(body)
            response = web.Response(status=reply.status, reason=reply.reason, body=filtered)
            response.headers.extend(headers)
            return response
        if patterns is not None and reply.content_type == "text/event-stream":
            chunks = _sse_filtered(patterns, chunks)
        streamed = web.StreamResponse(status=reply.status, reason=reply.reason)
        streamed.headers.extend(headers)
        decorate(request, streamed.headers, facts)
        await streamed.prepare(request)
        try:
            async for chunk in chunks:
                facts.bytes_out += len(chunk)
                async with asyncio.timeout(self.send_timeout):
                    await streamed.write(chunk)
            await streamed.write_eof()
        except (aiohttp.ClientError, TimeoutError) as err:
            # Cut short (by the MCP host, or a client taking nothing): closing the client's
            # connection is the only way to say so.
            log.info(
                "relay on route %s ended early (%s); closing the client connection",
                route.name,
                type(err).__name__,
            )
            if request.transport is not None:
                request.transport.close()
        except ConnectionResetError:
            log.debug("client went away on route %s", route.name)
        return streamed


def _upstream_url(base: str, target: str) -> URL:
    """`base` (a URL that may have a path) with the path below the prefix appended; the
    prefix itself is `base` exactly (no trailing slash added to a path that has none)."""
    path, _, query = target.partition("?")
    if path == "/" and URL(base).raw_path not in ("", "/"):
        path = ""
    return URL(base + path + ("?" + query if query else ""), encoded=True)
