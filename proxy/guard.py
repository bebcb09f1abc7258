"""Who may use the proxy, and with what: the inbound checks every request passes before it
is forwarded. Anyone whose request gets through acts with the key's full rights, so this
is deliberately strict (as kubectl proxy's --accept-hosts and Vault Proxy's listener are).

In order: no CONNECT, no absolute-form targets (never an open proxy); size limits; the Host
allowlist (DNS-rebinding defence); browsers only from allowed origins; the client token;
and a raw path with nothing that could mean one thing here and another upstream.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

from aiohttp import hdrs, web
from multidict import CIMultiDict
from pydantic import SecretStr

from . import errors
from .paths import HEALTH_PATH
from .settings import ServerSettings

__all__ = ["Guard"]

LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
# Fetch metadata: a browser marks requests a web page makes on its own behalf.
CROSS_SITE: Final = frozenset({"cross-site", "same-site"})
# Encoded forms of '/', '\' and NUL, which some servers decode before routing.
ENCODED_SEPARATORS: Final = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
PREFLIGHT_MAX_AGE: Final = "600"


def _host_name(host_header: str) -> str:
    """'Example.com:8787' -> 'example.com'; '[::1]:8787' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _path_problem(raw_path: str) -> str | None:
    """Why a raw path (query excluded) is refused, or None. Refusing beats normalising:
    a path the proxy and the API could read differently must not reach the API at all."""
    if "\\" in raw_path or any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw_path):
        return "backslashes, spaces and control characters are not allowed in the path"
    if ENCODED_SEPARATORS.search(raw_path):
        return "encoded '/', '\\' or NUL (%2F, %5C, %00) are not allowed in the path"
    segments = raw_path.split("/")[1:]
    if any(segment == "" for segment in segments[:-1]):
        return "empty path segments ('//') are not allowed"
    if any(unquote(segment) in (".", "..") for segment in segments):
        return "'.' and '..' path segments (plain or percent-encoded) are not allowed"
    return None


@dataclass(frozen=True, slots=True)
class Guard:
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]
    client_token: SecretStr | None = field(repr=False)
    max_url_length: int
    max_header_bytes: int
    max_header_count: int

    @classmethod
    def from_settings(cls, server: ServerSettings) -> Guard:
        return cls(
            allowed_hosts=LOOPBACK_NAMES | frozenset(server.allowed_hosts),
            allowed_origins=frozenset(server.allowed_origins),
            client_token=server.client_secret(),
            max_url_length=server.max_url_length,
            max_header_bytes=server.max_header_bytes,
            max_header_count=server.max_header_count,
        )

    def refusal(self, request: web.BaseRequest) -> web.Response | None:
        """The answer that refuses `request`, or None when it may be forwarded."""
        if request.method == hdrs.METH_CONNECT:
            return errors.refused(
                405, "method_not_allowed", "CONNECT is not supported: this is not an open proxy"
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
        if (
            len(request.raw_headers) > self.max_header_count
            or sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
            > self.max_header_bytes
        ):
            return errors.refused(
                431,
                "headers_too_large",
                f"more than {self.max_header_count} headers or {self.max_header_bytes} bytes "
                "of them",
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
        # Liveness says nothing but "up", and container health checks cannot send a token.
        needs_token = request.path != HEALTH_PATH
        if (
            needs_token
            and self.client_token is not None
            and not self._client_token_matches(request)
        ):
            response = errors.refused(
                407,
                "proxy_authentication_required",
                "send Proxy-Authorization: Bearer <the client token set in "
                "server.client_token, client_token_env or client_token_file>",
            )
            response.headers[hdrs.PROXY_AUTHENTICATE] = 'Bearer realm="appcircle-proxy"'
            return response
        problem = _path_problem(request.raw_path.partition("?")[0])
        if problem is not None:
            return errors.refused(400, "bad_path", problem)
        return None

    def _from_foreign_page(self, request: web.BaseRequest) -> bool:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None:
            return origin.rstrip("/").lower() not in self.allowed_origins
        return request.headers.get("Sec-Fetch-Site", "").lower() in CROSS_SITE

    def _client_token_matches(self, request: web.BaseRequest) -> bool:
        assert self.client_token is not None
        scheme, _, presented = request.headers.get(hdrs.PROXY_AUTHORIZATION, "").partition(" ")
        expected = self.client_token.get_secret_value().encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), expected
        )

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
