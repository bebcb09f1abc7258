"""Appcircle's MCP server through the proxy (issue 18): a real MCP client (the official
`mcp` SDK) against a stand-in MCP server built with the same SDK, which refuses requests
without a valid session token from the stand-in auth host; the route's token goes
upstream, the agent holds none, and `mcp_tools` keeps disallowed tools out of reach."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import uvicorn
from mcp import Client
from mcp.server.mcpserver import MCPServer

from proxy.config.errors import ConfigError
from proxy.config.load import load_settings
from proxy.policy.routes import Route
from proxy.serve.mcp import _filter_event, filter_tools, tool_refusal
from tests.support.standin import SIGNING_ALGORITHM, StandIn

from .conftest import ROOT_ORG, SUB_ORG, StartProxy, write_toml
from .support import request

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class McpStandIn:
    """The MCP host: what it saw (method, session id, organization of the token)."""

    url: str = ""
    seen: list[tuple[str, str | None, str]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    refused: int = 0


def build_server(state: McpStandIn) -> MCPServer:
    server = MCPServer("appcircle-standin")

    @server.tool()
    def list_build_profiles() -> str:
        """The build profiles."""
        state.calls.append("list_build_profiles")
        return "profiles: app-ios, app-android"

    @server.tool()
    def list_builds(profile: str) -> str:
        """The builds of a profile."""
        state.calls.append("list_builds")
        return f"builds of {profile}: 1, 2"

    @server.tool()
    def start_build(profile: str) -> str:
        """Start a build (spends build credits)."""
        state.calls.append("start_build")
        return f"started a build of {profile}"

    return server


def token_check(app: Any, standin: StandIn, state: McpStandIn) -> Any:
    """ASGI middleware: 401 unless `Authorization: Bearer` holds a token the stand-in auth
    host issued (signed with its key, not expired)."""

    async def checked(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        scheme, _, token = headers.get("authorization", "").partition(" ")
        try:
            claims = jwt.decode(token, standin.signing_key, algorithms=[SIGNING_ALGORITHM])
        except jwt.PyJWTError:
            claims = None
        if scheme != "Bearer" or claims is None:
            state.refused += 1
            body = json.dumps({"error": "invalid_token"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        state.seen.append(
            (scope["method"], headers.get("mcp-session-id"), claims["currentOrganizationId"])
        )
        await app(scope, receive, send)

    return checked


@pytest.fixture
async def mcp_standin(standin: StandIn) -> AsyncIterator[McpStandIn]:
    state = McpStandIn()
    app = build_server(state).streamable_http_app(streamable_http_path="/mcp")
    config = uvicorn.Config(
        token_check(app, standin, state),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        ws="none",
    )
    server = uvicorn.Server(config)
    # The test's loop owns the signals; uvicorn must not take them.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    state.url = f"http://127.0.0.1:{port}/mcp"
    yield state
    server.should_exit = True
    await task


def mcp_route(**extra: Any) -> dict[str, Any]:
    return {
        "api": {"prefix": "/", "credential": "main"},
        "agents": {"prefix": "/mcp", "credential": "main", "upstream": "mcp", **extra},
    }


async def test_the_stand_in_refuses_a_client_without_a_token(
    mcp_standin: McpStandIn, http: aiohttp.ClientSession
) -> None:
    """Guards the test itself: without the proxy's token the MCP host answers 401."""
    reply = await request(
        http,
        "POST",
        mcp_standin.url,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Accept": "application/json, text/event-stream"},
    )
    assert reply.status == 401
    assert mcp_standin.refused == 1


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_an_mcp_client_initializes_lists_and_calls_tools_through_an_mcp_route(
    start_proxy: StartProxy, standin: StandIn, mcp_standin: McpStandIn, mode: str
) -> None:
    """Guards streamable HTTP through the proxy with the route's token: legacy mode is the
    initialize handshake, SSE answers to POSTs, the GET SSE stream, Mcp-Session-Id both ways
    and the closing DELETE; auto is the 2026 protocol's JSON answers."""
    proxy = await start_proxy(routes=mcp_route(), appcircle={"mcp_url": mcp_standin.url})
    async with Client(f"{proxy}/mcp", mode=mode) as client:
        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} == {
            "list_build_profiles",
            "list_builds",
            "start_build",
        }
        result = await client.call_tool("list_builds", {"profile": "app-ios"})
        assert result.content[0].text == "builds of app-ios: 1, 2"  # type: ignore[union-attr]
    assert mcp_standin.calls == ["list_builds"]
    assert mcp_standin.refused == 0
    assert {organization for _, _, organization in mcp_standin.seen} == {ROOT_ORG}
    if mode == "legacy":
        methods = [method for method, _, _ in mcp_standin.seen]
        assert {"GET", "DELETE"} <= set(methods)
        sessions = {session for _, session, _ in mcp_standin.seen[1:]}
        assert len(sessions) == 1 and None not in sessions
    assert standin.api_requests == []


async def test_a_route_for_a_sub_organization_sends_its_token_to_the_mcp_host(
    start_proxy: StartProxy, standin: StandIn, mcp_standin: McpStandIn
) -> None:
    """Guards the route's token choice: an agent at /eu-agents acts for the sub-organization."""
    routes = {
        "agents": {
            "prefix": "/eu-agents",
            "credential": "main",
            "sub_organization": SUB_ORG,
            "upstream": mcp_standin.url,  # an absolute URL works as well as "mcp"
        }
    }
    proxy = await start_proxy(routes=routes)
    async with Client(f"{proxy}/eu-agents", mode="legacy") as client:
        await client.call_tool("list_build_profiles", {})
    assert {organization for _, _, organization in mcp_standin.seen} == {SUB_ORG}


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_mcp_tools_hides_and_refuses_every_other_tool(
    start_proxy: StartProxy,
    standin: StandIn,
    mcp_standin: McpStandIn,
    http: aiohttp.ClientSession,
    mode: str,
) -> None:
    """Guards mcp_tools = ["list_*"]: tools/list shows only the allowed tools (in JSON and
    in SSE answers), and a tools/call of start_build gets a JSON-RPC error from the proxy
    and never reaches the MCP host, from the SDK or from a hand-written request."""
    proxy = await start_proxy(
        routes=mcp_route(mcp_tools=["list_*"]), appcircle={"mcp_url": mcp_standin.url}
    )
    async with Client(f"{proxy}/mcp", mode=mode) as client:
        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} == {"list_build_profiles", "list_builds"}
        allowed = await client.call_tool("list_builds", {"profile": "p"})
        assert not allowed.is_error
        posts = len(mcp_standin.seen)
        with pytest.raises(Exception, match="not allowed") as refused:
            result = await client.session.call_tool("start_build", {"profile": "p"})
            raise AssertionError(f"start_build was answered: {result}")
        assert "mcp_tools" in str(refused.value)
        assert len(mcp_standin.seen) == posts
    reply = await request(
        http,
        "POST",
        f"{proxy}/mcp",
        json={
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "start_build", "arguments": {"profile": "p"}},
        },
        headers={"Accept": "application/json, text/event-stream"},
    )
    assert reply.status == 200
    answer = reply.json()
    assert answer["id"] == 7 and answer["error"]["code"] == -32602
    assert "start_build" in answer["error"]["message"]
    assert mcp_standin.calls == ["list_builds"]


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ({"upstream": "ftp://mcp.example"}, 'is not "api", "mcp" or an http(s) URL'),
        ({"mcp_tools": ["list_*"]}, 'set upstream = "mcp"'),
        ({"upstream": "mcp", "mcp_tools": []}, "mcp_tools is empty"),
    ],
)
def test_a_bad_upstream_or_mcp_tools_stops_start_up_naming_it(
    route: dict[str, Any], problem: str, tmp_path: Path
) -> None:
    """Guards the start-up checks of the two route settings."""
    path = tmp_path / "proxy.toml"
    write_toml(path, routes={"agents": {"prefix": "/mcp", "credential": "main", **route}})
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert "routes.agents" in str(raised.value)
    assert problem in str(raised.value)


def test_a_batch_with_one_disallowed_call_is_refused_whole_and_lists_are_filtered() -> None:
    """Guards the JSON-RPC shapes the SDK does not send: a batch holding a disallowed
    tools/call gets an error per request (none is sent on), notifications get none; a
    batch of answers has each tools/list result filtered; an SSE event with CRLF lines
    keeps its other fields."""
    route = Route(
        name="agents",
        prefix="/mcp",
        credential=None,  # type: ignore[arg-type]
        sub_organization=None,
        tokens=None,  # type: ignore[arg-type]
        upstream_url="https://mcp.example",
        mcp_tools=("list_*",),
    )
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_builds"}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "start_build"}},
        {"jsonrpc": "2.0", "method": "notifications/progress"},
    ]
    refusal = tool_refusal(route, json.dumps(batch).encode())
    assert refusal is not None
    answers = json.loads(refusal)
    assert [answer["id"] for answer in answers] == [1, 2]
    assert "start_build" in answers[1]["error"]["message"]
    assert "not sent" in answers[0]["error"]["message"]
    assert tool_refusal(route, json.dumps(batch[:1]).encode()) is None

    listed = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "list_a"}, {"name": "x"}]}}
    assert filter_tools(("list_*",), [listed])[0]["result"]["tools"] == [{"name": "list_a"}]
    event = b"event: message\r\nid: 7\r\ndata: " + json.dumps(listed).encode()
    filtered = _filter_event(("list_*",), event)
    assert filtered.startswith(b"event: message\nid: 7\ndata: ")
    assert b'"x"' not in filtered
