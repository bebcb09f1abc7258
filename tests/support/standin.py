"""A stand-in for Appcircle's auth and API hosts, with fault switches, for the tests.

Real aiohttp servers on loopback: the auth host issues signed JWTs from the contract's four
token endpoints; the API host demands `Authorization: Bearer <valid JWT>`, answers 401 to a
missing, forged, expired or revoked one, and echoes what it received. Attributes are knobs
a test turns to make the auth host fail, stall or misbehave.

Fault modes: the auth host answers errors (`always = 500`) or garbage (`always =
"not-json"`), hangs (`gate = asyncio.Event()`; `gate.set()` lets the held exchanges answer);
the API is slow (`api_delay`) or refuses every token on an endpoint (`/_test/status/401`);
either host crashes and comes back on the same port (`kill`, `revive`).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import secrets
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from aiohttp import WSMsgType, web
from yarl import URL

__all__ = ["Exchange", "Host", "SeenRequest", "StandIn", "cli_answer", "pattern"]

# What the auth host does with the next exchange instead of answering normally.
Misbehaviour = int | Literal["not-json", "no-token", "not-jwt", "expired", "no-exp"]
Host = Literal["auth", "api"]

SIGNING_ALGORITHM = "HS256"
CLAIMS = web.RequestKey("claims", dict[str, Any])


@dataclass(frozen=True, slots=True)
class Exchange:
    """One exchange the auth host answered: which endpoint, which fields, what it issued."""

    endpoint: str
    fields: frozenset[str]
    requested_organization: str | None
    status: int
    organization: str | None = None


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request the API host saw with a valid token."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]] = field(repr=False)
    organization: str
    token_id: str


@dataclass
class StandIn:
    clock: Callable[[], float] = time.time
    token_lifetime: float = 3600.0
    # Which form field names the sub-organization; None: ignore it (and issue root tokens).
    sub_organization_field: Literal["subOrganization", "subOrganizationId"] | None = (
        "subOrganization"
    )
    send_expires_in: bool = False
    # False: tokens carry no organization claim (currentOrganizationId) at all.
    organization_claim: bool = True
    # The API host served under this path (an API behind a path-routing gateway): its
    # API URL is then `api_url + api_base_path`, and nothing outside that path exists.
    api_base_path: str = ""
    # Misbehaviours for the next exchanges, consumed one per exchange; `always` repeats.
    script: list[Misbehaviour] = field(default_factory=list)
    always: Misbehaviour | None = None
    # Sent as Retry-After with every refused exchange (a rate-limited auth host's 429).
    retry_after: str | None = None
    # While set and not yet released, exchanges wait on it (to hold one in flight).
    gate: asyncio.Event | None = None
    # Seconds the API host takes before answering each request it accepted (a slow API).
    api_delay: float = 0.0
    # Answer the official CLI's list and organization reads with Appcircle-shaped JSON
    # (`cli_answer`) instead of the echo, so the CLI can print its tables.
    cli_answers: bool = False
    # Keep `api_requests`; off for long runs, where the list would only grow.
    record_requests: bool = True
    personal_keys: dict[str, str] = field(default_factory=dict, repr=False)
    api_keys: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    sub_organizations: dict[str, set[str]] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)
    exchanges_started: int = 0
    api_requests: list[SeenRequest] = field(default_factory=list)
    # Requests the auth host's userinfo endpoint answered with a valid token.
    userinfo_requests: list[SeenRequest] = field(default_factory=list)
    # Extra bytes in each userinfo answer (to make one too large to be a userinfo answer).
    userinfo_padding: int = 0
    rejected_tokens: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    # Requests being handled by the API host now, and the most at once.
    in_flight: int = 0
    max_in_flight: int = 0
    # /_test/events sends its first event, then one more each time this is set.
    events_gate: asyncio.Event | None = None
    # Close codes WebSocket clients sent to /_test/ws.
    websocket_closes: list[int] = field(default_factory=list)
    # Every token issued, so tests can prove none of them leaks into logs or output.
    issued_tokens: list[str] = field(default_factory=list, repr=False)
    auth_url: str = ""
    api_url: str = ""
    # Shared by stand-ins in separate processes (auth and API apart) so each accepts the
    # other's tokens, and a restarted one those issued before.
    signing_key: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    _runners: dict[Host, web.AppRunner] = field(default_factory=dict, repr=False)
    _tls: ssl.SSLContext | None = field(default=None, repr=False)
    _issued: set[str] = field(default_factory=set, repr=False)

    # -- accounts ---------------------------------------------------------------------
    def add_personal_key(self, key: str, organization: str, *subs: str) -> None:
        self.personal_keys[key] = organization
        self.sub_organizations.setdefault(organization, set()).update(subs)

    def add_api_key(self, name: str, secret: str, organization: str, *subs: str) -> None:
        self.api_keys[(name, secret)] = organization
        self.sub_organizations.setdefault(organization, set()).update(subs)

    def revoke_all(self) -> None:
        """Revoke every token issued so far (as a key rotation on Appcircle's side would)."""
        self.revoked.update(self._issued)

    # -- servers ----------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        """Serve both hosts on free ports of `host`, over TLS when given a server context."""
        await self.serve("auth", host, tls=tls)
        await self.serve("api", host, tls=tls)

    async def close(self) -> None:
        for runner in self._runners.values():
            await runner.cleanup()
        self._runners.clear()

    async def serve(
        self, which: Host, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> str:
        """Serve one host on `port` (0: a free one); sets and returns its URL."""
        app = self._auth_app() if which == "auth" else self._api_app()
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        await site.start()
        self._runners[which] = runner
        self._tls = tls
        url = f"{'https' if tls else 'http'}://{host}:{runner.addresses[0][1]}"
        if which == "auth":
            self.auth_url = url
        else:
            self.api_url = url
        return url

    async def kill(self, which: Host) -> None:
        """Stop serving one host as a crash would: connections reset, requests cut, the port
        refusing connections until `revive`."""
        runner = self._runners.pop(which)
        if runner.server is not None:
            for connection in runner.server.connections:
                if connection.transport is not None:
                    connection.transport.abort()
        await runner.cleanup()

    async def revive(self, which: Host) -> None:
        """Serve a killed host again, on the port it had."""
        url = URL(self.auth_url if which == "auth" else self.api_url)
        assert url.host is not None and url.port is not None
        await self.serve(which, url.host, url.port, tls=self._tls)

    @property
    def api_connections(self) -> int:
        """Connections open to the API host now."""
        server = self._runners["api"].server
        return len(server.connections) if server is not None else 0

    # -- auth host --------------------------------------------------------------------
    def _auth_app(self) -> web.Application:
        app = web.Application()
        for endpoint in ("/auth/v3/token", "/auth/v2/token", "/auth/v1/token"):
            app.router.add_post(endpoint, self._personal_exchange)
        app.router.add_post("/auth/v1/api-key/token", self._api_key_exchange)
        app.router.add_get(
            "/auth/realms/appcircle/protocol/openid-connect/userinfo", self._userinfo
        )
        return app

    async def _userinfo(self, request: web.Request) -> web.Response:
        """OpenID Connect userinfo: the claims of a valid token, 401 for any other."""
        claims = self._valid_claims(request)
        if claims is None:
            return web.json_response({"error": "invalid_token"}, status=401)
        self.userinfo_requests.append(_seen(request, claims))
        return web.json_response(
            {
                "sub": claims["sub"],
                "email": claims["email"],
                "email_verified": True,
                "currentOrganizationId": claims["currentOrganizationId"],
                **({"padding": "x" * self.userinfo_padding} if self.userinfo_padding else {}),
            }
        )

    async def _personal_exchange(self, request: web.Request) -> web.Response:
        form = await request.post()
        field_name = "personalAccessKey" if request.path == "/auth/v3/token" else "pat"
        organization = self.personal_keys.get(str(form.get(field_name, "")))
        wanted = None
        if self.sub_organization_field is not None:
            wanted = form.get(self.sub_organization_field)
        return await self._issue(request, form, organization, str(wanted) if wanted else None)

    async def _api_key_exchange(self, request: web.Request) -> web.Response:
        form = await request.post()
        organization = self.api_keys.get((str(form.get("name", "")), str(form.get("secret", ""))))
        wanted = form.get("organizationId")
        return await self._issue(request, form, organization, str(wanted) if wanted else None)

    async def _issue(
        self, request: web.Request, form: Any, root: str | None, wanted: str | None
    ) -> web.Response:
        self.exchanges_started += 1
        if self.gate is not None:
            await self.gate.wait()
        misbehaviour = self.script.pop(0) if self.script else self.always
        fields = frozenset(form.keys())
        status, organization = 200, wanted or root
        if request.headers.get("Content-Type") != "application/x-www-form-urlencoded":
            status = 415
        elif root is None:
            status = 401
        elif wanted is not None:
            try:
                uuid.UUID(wanted)
            except ValueError:
                status = 400
            else:
                if wanted != root and wanted not in self.sub_organizations.get(root, set()):
                    status = 403
        if isinstance(misbehaviour, int):
            status = misbehaviour
        self.exchanges.append(
            Exchange(request.path, fields, wanted, status, organization if status == 200 else None)
        )
        if status != 200:
            refusal = web.json_response({"error": "refused", "status": status}, status=status)
            if self.retry_after is not None:
                refusal.headers["Retry-After"] = self.retry_after
            return refusal
        assert organization is not None
        now = self.clock()
        token_id = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "sub": f"user-of-{root}",
            "email": "ci@example.com",
            "currentOrganizationId": organization,
            "iat": now,
            "exp": now + self.token_lifetime,
            "jti": token_id,
        }
        if misbehaviour == "expired":
            claims["exp"] = now - 10
        if misbehaviour == "no-exp":
            del claims["exp"]
        if not self.organization_claim:
            del claims["currentOrganizationId"]
        self._issued.add(token_id)
        token = jwt.encode(claims, self.signing_key, algorithm=SIGNING_ALGORITHM)
        self.issued_tokens.append(token)
        if misbehaviour == "not-json":
            return web.Response(text="<html>Bad gateway</html>", content_type="text/html")
        if misbehaviour == "not-jwt":
            token = "not-a-jwt"
        reply: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if misbehaviour == "no-token":
            del reply["access_token"]
        if self.send_expires_in:
            reply["expires_in"] = self.token_lifetime / 2
        return web.json_response(reply)

    # -- API host ---------------------------------------------------------------------
    def _api_app(self) -> web.Application:
        app = web.Application(middlewares=[self._require_token])
        app.router.add_get("/_test/redirect", self._redirect)
        app.router.add_get("/_test/gzip", self._gzip)
        app.router.add_get("/_test/slow", self._slow)
        app.router.add_get("/_test/cut", self._cut)
        app.router.add_get("/_test/hop-by-hop", self._hop_by_hop)
        app.router.add_get("/_test/cors", self._cors)
        app.router.add_get("/_test/status/{status:\\d+}", self._status)
        app.router.add_get("/_test/download", self._download)
        app.router.add_get("/_test/events", self._events)
        app.router.add_get("/_test/ws", self._websocket)
        app.router.add_route("*", "/{path:.*}", self._echo)
        if not self.api_base_path:
            return app
        gateway = web.Application()
        gateway.add_subapp(self.api_base_path, app)
        return gateway

    @web.middleware
    async def _require_token(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        claims = self._valid_claims(request)
        if claims is None:
            return web.json_response({"message": "Unauthorized"}, status=401)
        request[CLAIMS] = claims
        if self.record_requests:
            self.api_requests.append(_seen(request, claims))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.api_delay:
                await asyncio.sleep(self.api_delay)
            response: web.StreamResponse = await handler(request)
        finally:
            self.in_flight -= 1
        return response

    def _valid_claims(self, request: web.Request) -> dict[str, Any] | None:
        """The claims of the request's `Authorization: Bearer` token if it is one this
        stand-in issued and neither expired nor revoked; else None (and the reason noted)."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        try:
            if scheme != "Bearer":
                raise jwt.InvalidTokenError("no bearer token")
            claims: dict[str, Any] = jwt.decode(
                token,
                self.signing_key,
                algorithms=[SIGNING_ALGORITHM],
                # Times are judged by `self.clock` (below), not by the real one.
                options={"verify_exp": False, "verify_iat": False, "require": ["exp", "jti"]},
            )
            if claims["exp"] <= self.clock():
                raise jwt.ExpiredSignatureError("expired")
            if claims["jti"] in self.revoked:
                raise jwt.InvalidTokenError("revoked")
        except jwt.PyJWTError as err:
            self.rejected_tokens.append(type(err).__name__)
            return None
        return claims

    async def _echo(self, request: web.Request) -> web.Response:
        organization = request[CLAIMS]["currentOrganizationId"]
        if self.cli_answers and request.method == "GET":
            answer = cli_answer(request.path, organization)
            if answer is not None:
                return web.json_response(answer)
        digest, length = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[name, value] for name, value in request.headers.items()],
                "body_sha256": digest.hexdigest(),
                "body_length": length,
                "organization": organization,
            }
        )

    async def _redirect(self, request: web.Request) -> web.Response:
        default = f"{self.api_url}{self.api_base_path}/build/v2/profiles?page=1"
        target = request.query.get("to", default)
        return web.Response(status=302, headers={"Location": target})

    async def _gzip(self, request: web.Request) -> web.Response:
        body = gzip.compress(b'{"compressed": true}')
        return web.Response(
            body=body,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "1")))
        return web.json_response({"slow": True})

    async def _cut(self, request: web.Request) -> web.StreamResponse:
        """Promises `length` bytes (default 100000; 'chunked': no length) and dies after 1000."""
        length = request.query.get("length", "100000")
        response = web.StreamResponse()
        if length != "chunked":
            response.headers["Content-Length"] = length
        await response.prepare(request)
        await response.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _hop_by_hop(self, request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "Connection": "X-Private-Hop",
                "X-Private-Hop": "must not pass",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-Kept": "passes",
            },
        )

    async def _cors(self, request: web.Request) -> web.Response:
        """An API that answers with CORS headers of its own (too permissive ones)."""
        return web.json_response(
            {"cors": "from the API"},
            headers={
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": "X-Internal",
                "X-Kept": "passes",
            },
        )

    async def _status(self, request: web.Request) -> web.StreamResponse:
        """The status asked for, with `reason` as its reason phrase if given; a small JSON
        body, or with `size`, that many bytes streamed (no Content-Length)."""
        status = int(request.match_info["status"])
        reason = request.query.get("reason")
        if "size" not in request.query:
            return web.json_response({"status": "as asked"}, status=status, reason=reason)
        response = web.StreamResponse(status=status, reason=reason)
        await response.prepare(request)
        for chunk in pattern(int(request.query["size"])):
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """`size` bytes of `pattern(size)`, streamed; chunked unless `length=1`."""
        size = int(request.query["size"])
        response = web.StreamResponse()
        if request.query.get("length") == "1":
            response.content_length = size
        await response.prepare(request)
        try:
            for chunk in pattern(size):
                await response.write(chunk)
        except ConnectionResetError:
            return response  # the client (the proxy) went away: nothing more to do
        await response.write_eof()
        return response

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events, the next one only when the test sets `events_gate`."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for number in range(int(request.query.get("count", "3"))):
            if number and self.events_gate is not None:
                await self.events_gate.wait()
                self.events_gate.clear()
            await response.write(f"data: event {number}\n\n".encode())
        await response.write_eof()
        return response

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Echoes messages; 'close-me' makes it close with 4000; records clients' closes."""
        socket = web.WebSocketResponse(protocols=("appcircle.v1",), autoclose=False)
        await socket.prepare(request)
        while True:
            message = await socket.receive()
            if message.type is WSMsgType.TEXT and message.data == "close-me":
                await socket.close(code=4000, message=b"bye")
                return socket
            if message.type is WSMsgType.TEXT:
                await socket.send_str("echo: " + message.data)
            elif message.type is WSMsgType.BINARY:
                await socket.send_bytes(message.data[::-1])
            elif message.type is WSMsgType.CLOSE:
                self.websocket_closes.append(int(message.data))
                await socket.close()
                return socket
            else:
                return socket


def _seen(request: web.Request, claims: dict[str, Any]) -> SeenRequest:
    return SeenRequest(
        request.method,
        request.raw_path,
        list(request.headers.items()),
        claims["currentOrganizationId"],
        claims["jti"],
    )


def cli_answer(path: str, organization: str) -> Any:
    """What Appcircle answers the official CLI's `build profile list`, `testing-distribution
    profile list`, `testing-distribution testing-group list` and `organization view` (the
    fields its tables read), for the token's organization; None for any other path."""
    stamp = "2026-01-02T03:04:05Z"
    if path == "/build/v2/profiles":
        return [
            {
                "id": f"build-{organization[:8]}",
                "name": f"app of {organization[:8]}",
                "pinned": False,
                "os": 1,
                "buildPlatformType": 2,
                "repositoryName": "app",
                "lastBuildDate": stamp,
                "autoDistributeCount": 0,
                "autoBuildCount": 0,
            }
        ]
    if path == "/distribution/v2/profiles":
        return [
            {
                "id": f"dist-{organization[:8]}",
                "name": f"testers of {organization[:8]}",
                "pinned": False,
                "iOSVersion": "1.0 (1)",
                "androidVersion": None,
                "updateDate": stamp,
                "lastAppVersionSharedDate": None,
                "settings": {"authenticationType": 1},
                "testingGroupIds": None,
            }
        ]
    if path == "/distribution/v2/testing-groups":
        return [{"id": f"group-{organization[:8]}", "name": "qa", "testers": ["qa@example.com"]}]
    prefix = "/identity/v1/organizations/"
    if path.startswith(prefix) and "/" not in path[len(prefix) :]:
        wanted = path[len(prefix) :]
        return {
            "id": wanted,
            "name": f"organization {wanted[:8]}",
            "givenId": None,
            "memberCount": 1,
            "ssoEnabled": False,
            "createdDate": stamp,
            "rootOrganizationId": None,
        }
    return None


PATTERN_BLOCK = hashlib.sha256(b"appcircle-proxy").digest() * 2048  # 64 KiB, fixed


def pattern(size: int) -> Iterator[bytes]:
    """`size` bytes of a fixed pattern in 64 KiB chunks: downloads checkable without storing."""
    whole, rest = divmod(size, len(PATTERN_BLOCK))
    for _ in range(whole):
        yield PATTERN_BLOCK
    if rest:
        yield PATTERN_BLOCK[:rest]
