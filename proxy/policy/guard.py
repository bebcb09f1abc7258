"""Who may use the proxy, and with what: the inbound checks every request passes before it
is forwarded. Anyone whose request gets through acts with the key's full rights, so this
is deliberately strict (as kubectl proxy's --accept-hosts and Vault Proxy's listener are).

In order: no CONNECT, TRACE or TRACK, no absolute-form targets (never an open proxy); size
limits; header values that are UTF-8; the Host allowlist, parsed strictly (DNS-rebinding
defence); browsers only from allowed origins; the client token; and a raw path with nothing
that could mean one thing here and another upstream.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import ipaddress
import itertools
import re
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

from aiohttp import hdrs, web
from multidict import CIMultiDict

from ..auth.local_tokens import LocalClaims, LocalTokens
from ..config.secrets import Client, read_clients
from ..config.settings import Settings
from ..paths import HEALTH_PATH
from ..telemetry.facts import Facts
from . import errors

__all__ = ["Guard"]

LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
# TRACE echoes the request, credentials included (RFC 9110 9.3.8: never send them with it);
# TRACK is Microsoft's TRACE.
REFUSED_METHODS: Final = frozenset({hdrs.METH_CONNECT, hdrs.METH_TRACE, "TRACK"})
# name[:port] or [ipv6][:port] and nothing else: no userinfo, no trailing text after ']'.
HOST_HEADER: Final = re.compile(
    r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9_.-]+))(?::[0-9]{1,5})?", re.ASCII
)
# Fetch metadata: a browser marks requests a web page makes on its own behalf.
CROSS_SITE: Final = frozenset({"cross-site", "same-site"})
# Encoded forms of '/', '\' and NUL, which some servers decode before routing.
ENCODED_SEPARATORS: Final = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
# '%25' is an encoded '%': a server that decodes twice would see '%2e%2e' become '..'.
DOUBLE_ENCODED: Final = re.compile(r"%25")
PREFLIGHT_MAX_AGE: Final = "600"
# Anything `_path_problem` might refuse: a path with none of these (most paths) is clean
# after one scan. A control character, space, backslash or '#'; a '%' (encoded separators,
# '%25', encoded dots); a '.'; or '//'.
SUSPECT_PATH: Final = re.compile(r"[\x00-\x20\x7f\\#%.]|//")
# A decoded segment that some server reads as '.' or '..': the dots with whitespace or
# control characters around them, which servers and file systems trim ('..%09', '%00..').
DOT_SEGMENT: Final = re.compile(r"[\s\x00-\x1f\x7f-\x9f]*\.\.?[\s\x00-\x1f\x7f-\x9f]*")


# Clients send the same few Host values: each is parsed once (bounded: a client sending
# ever new ones only churns the cache).
@functools.lru_cache(maxsize=256)
def _host_name(host_header: str) -> str | None:
    """'Example.com:8787' -> 'example.com'; '[::1]:8787' -> '::1'; None for anything that
    is not strictly name[:port] or [ipv6][:port] ('[::1].evil.com', 'localhost:x@evil.com')."""
    match = HOST_HEADER.fullmatch(host_header.strip().lower())
    if match is None:
        return None
    if match["ipv6"] is None:
        return match["name"]
    try:
        return str(ipaddress.IPv6Address(match["ipv6"]))
    except ValueError:
        return None


def _undecodable(value: str) -> bool:
    """aiohttp decodes header bytes as UTF-8 with surrogateescape: a surrogate left in the
    text is a byte that was not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path_problem(raw_path: str) -> str | None:
    """Why a raw path (query excluded) is refused, or None. Refusing beats normalising:
    a path the proxy and the API could read differently must not reach the API at all."""
    if SUSPECT_PATH.search(raw_path) is None:
        return None
    if "\\" in raw_path or any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw_path):
        return "backslashes, spaces and control characters are not allowed in the path"
    if "#" in raw_path:
        # A server drops a fragment: the path it serves is not the one the rules saw.
        return "a fragment ('#') is not allowed in a request target"
    if ENCODED_SEPARATORS.search(raw_path):
        return "encoded '/', '\\' or NUL (%2F, %5C, %00) are not allowed in the path"
    if DOUBLE_ENCODED.search(raw_path):
        return "double percent-encoding (%25) is not allowed in the path"
    segments = raw_path.split("/")[1:]
    if any(segment == "" for segment in segments[:-1]):
        return "empty path segments ('//') are not allowed"
    # Some servers (Tomcat, Spring) drop ';parameters' before resolving dot segments.
    if any(DOT_SEGMENT.fullmatch(unquote(segment).partition(";")[0]) for segment in segments):
        return (
            "'.' and '..' path segments (plain, percent-encoded, with ';parameters' or with "
            "whitespace or control characters around them) are not allowed"
        )
    return None


def _presented_token(credentials: str) -> bytes | None:
    """The token in an Authorization-style header value: `Bearer <t>`, or `Basic` with <t>
    as the password (any user name); None when there is none."""
    scheme, _, value = credentials.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip().encode()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except binascii.Error:
            return None
        _user, colon, password = decoded.partition(b":")
        return password if colon else None
    return None


def _client_token_refusal(request: web.BaseRequest) -> web.Response:
    """401 for a client that sent Authorization only (ordinary clients understand that);
    407 otherwise, as a proxy answers."""
    setting = (
        "the client token set in server.client_token, client_token_env or client_token_file, "
        "or your clients.NAME token"
    )
    if hdrs.AUTHORIZATION in request.headers and hdrs.PROXY_AUTHORIZATION not in request.headers:
        response = errors.refused(
            401,
            "client_token_required",
            f"this proxy wants its client token, and the Authorization header does not hold "
            f"it: send Authorization: Bearer <{setting}> (for the appcircle CLI: appcircle "
            "config set AC_ACCESS_TOKEN <client token>)",
        )
        response.headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="appcircle-proxy"'
        return response
    response = errors.refused(
        407,
        "proxy_authentication_required",
        f"send Proxy-Authorization: Bearer <{setting}>, or the same in Authorization",
    )
    response.headers[hdrs.PROXY_AUTHENTICATE] = 'Bearer realm="appcircle-proxy"'
    return response


@dataclass(frozen=True, slots=True)
class Guard:
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]
    # Empty: no client token is asked for.
    clients: tuple[Client, ...] = field(repr=False)
    max_url_length: int
    max_header_bytes: int
    max_header_count: int
    # The key exchanges answered at the proxy (each route's prefix + endpoint): they carry
    # the client token as their key, not in a header, and check it themselves.
    exchange_paths: frozenset[str] = frozenset()
    # A local token from one of those exchanges stands for the client token it was got with.
    local_tokens: LocalTokens | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        exchange_paths: frozenset[str] = frozenset(),
        local_tokens: LocalTokens | None = None,
    ) -> Guard:
        server = settings.server
        return cls(
            allowed_hosts=LOOPBACK_NAMES | frozenset(server.allowed_hosts),
            allowed_origins=frozenset(server.allowed_origins),
            clients=read_clients(settings),
            max_url_length=server.max_url_length,
            max_header_bytes=server.max_header_bytes,
            max_header_count=server.max_header_count,
            exchange_paths=exchange_paths,
            local_tokens=local_tokens,
        )

    def refusal(self, request: web.BaseRequest, path: str, facts: Facts) -> web.Response | None:
        """The answer that refuses `request`, or None when it may be forwarded. `path` is
        its raw path without the query; the client its token names goes into `facts`."""
        if request.method in REFUSED_METHODS:
            return errors.refused(
                405,
                "method_not_allowed",
                f"{request.method} is not supported: CONNECT would make this an open proxy, "
                "and TRACE and TRACK would echo the session token back",
            )
        if not request.raw_path.startswith("/"):
            return errors.refused(
                400,
                "absolute_form",
                "requests must name a path (GET /build/v2/profiles), not a full URL: use the "
                "proxy as your API base URL, not as an HTTP proxy",
            )
        if len(request.raw_path) > self.max_url_length:
            return errors.refused(
                414, "url_too_long", f"the URL is longer than {self.max_url_length} bytes"
            )
        raw = request.raw_headers
        # Names and values in one string: its length bounds the headers, and when it is
        # ASCII (nearly always) no value needs a closer look.
        joined = b"".join(itertools.chain.from_iterable(raw))
        if len(raw) > self.max_header_count or len(joined) + 4 * len(raw) > self.max_header_bytes:
            return errors.refused(
                431,
                "headers_too_large",
                f"more than {self.max_header_count} headers or {self.max_header_bytes} bytes "
                "of them",
            )
        if not joined.isascii() and any(map(_undecodable, request.headers.values())):
            return errors.refused(
                400,
                "header_not_utf8",
                "a header value holds bytes that are not UTF-8; send header values as ASCII "
                "(percent- or base64-encode anything else)",
            )
        if _host_name(request.headers.get(hdrs.HOST, "")) not in self.allowed_hosts:
            return errors.refused(
                403,
                "host_not_allowed",
                "this proxy only answers requests addressed to localhost, 127.0.0.1 or [::1]; "
                "to reach it by another name, add that name to server.allowed_hosts",
            )
        if self._from_foreign_page(request):
            return errors.refused(
                403,
                "origin_not_allowed",
                "requests from web pages are refused, so a site you visit cannot use your "
                "key; to allow a page, add its origin to server.allowed_origins",
            )
        # Liveness says nothing but "up", and container health checks cannot send a token;
        # nor can a browser's CORS preflight (an allowed origin's, as refused ones are above).
        if (
            self.clients
            and path != HEALTH_PATH
            and not self._is_preflight(request)
            # Key exchanges carry the client token as their key and check it themselves.
            and not (request.method == hdrs.METH_POST and path in self.exchange_paths)
        ):
            client = self._client(request)
            local = None if client is not None else self._local_token(request)
            if client is not None:
                facts.client = client.name
            elif (
                local is not None and local.client is not None and local.expires_at > self._clock()
            ):
                # A local token stands for the client whose token its exchange was given.
                facts.client = local.client
            else:
                if local is not None:
                    return errors.refused(
                        401,
                        "local_token_expired",
                        "this token from the proxy's key exchange has expired: exchange again "
                        "(log in again), as with a token from Appcircle's auth host",
                    )
                return _client_token_refusal(request)
        problem = _path_problem(path)
        if problem is not None:
            return errors.refused(400, "bad_path", problem)
        return None

    def _from_foreign_page(self, request: web.BaseRequest) -> bool:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None:
            return origin.rstrip("/").lower() not in self.allowed_origins
        return request.headers.get("Sec-Fetch-Site", "").lower() in CROSS_SITE

    def _client(self, request: web.BaseRequest) -> Client | None:
        """The client whose token is in either header, as Bearer or as HTTP Basic's
        password (most tools, the appcircle CLI, Postman, SDKs, can only set
        Authorization); None when no client's is."""
        presented = [
            _presented_token(request.headers.get(name, ""))
            for name in (hdrs.PROXY_AUTHORIZATION, hdrs.AUTHORIZATION)
        ]
        found: Client | None = None
        # Both headers against every client, always: the timing tells neither which header
        # held a token nor which client's it is.
        for client in self.clients:
            expected = client.token.get_secret_value().encode()
            matched = False
            for token in presented:
                matched |= token is not None and hmac.compare_digest(token, expected)
            if matched and found is None:
                found = client
        return found

    def client_may_use(self, client: str, route: str) -> bool:
        """Whether a named client limited to some routes may use `route`."""
        for known in self.clients:
            if known.name == client:
                return known.routes is None or route in known.routes
        return True

    def _local_token(self, request: web.BaseRequest) -> LocalClaims | None:
        """A local token (see auth.local_tokens), expired or not; which route it is for is
        the handler's check, once the route is known."""
        if self.local_tokens is None:
            return None
        return self.local_tokens.read(request.headers.get(hdrs.AUTHORIZATION))

    def _clock(self) -> float:
        assert self.local_tokens is not None
        return self.local_tokens.clock()

    @staticmethod
    def _is_preflight(request: web.BaseRequest) -> bool:
        return (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ORIGIN in request.headers
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        )

    def preflight_answer(self, request: web.BaseRequest) -> web.Response | None:
        """A CORS preflight (already past `refusal`, so from an allowed origin) is answered
        here, never forwarded; its CORS headers come from `apply_cors`."""
        if self._is_preflight(request):
            return web.Response(status=204)
        return None

    def apply_cors(self, request: web.BaseRequest, headers: CIMultiDict[str]) -> None:
        """CORS headers for an allowed origin and never otherwise (the API's own were
        dropped with the other response headers)."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or origin.rstrip("/").lower() not in self.allowed_origins:
            return
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        headers.add(hdrs.VARY, "Origin")
        if self._is_preflight(request):
            headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = request.headers[
                hdrs.ACCESS_CONTROL_REQUEST_METHOD
            ]
            if requested := request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS):
                headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = requested
            headers[hdrs.ACCESS_CONTROL_MAX_AGE] = PREFLIGHT_MAX_AGE
