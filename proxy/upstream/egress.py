"""A corporate egress proxy between this proxy and Appcircle: which one (HTTPS_PROXY,
HTTP_PROXY, NO_PROXY and their lowercase forms, read by the stdlib as curl and aiohttp read
them), and the CONNECT tunnel the forwarding client opens through it.

The forwarding client tunnels both https and plain-http API URLs (as curl's
--proxytunnel does), so its own HTTP/1.1 connection code runs unchanged inside the tunnel,
TLS included (asyncio's start_tls over the tunnel). aiohttp's clients (token exchanges,
userinfo, WebSockets) follow the same variables through `trust_env`.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.request
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

from yarl import URL

from ..config.errors import ConfigError
from .connection import UpstreamError

__all__ = ["EgressError", "EgressProxy", "egress_proxy_for", "open_tunnel"]

# A CONNECT answer is a status line and a few headers; anything far larger is not one.
MAX_REPLY_HEAD: Final = 16 * 1024


class EgressError(ConfigError):
    """An egress proxy setting the proxy cannot use (say, an https:// proxy URL)."""


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """An HTTP egress proxy; `str()` is its address without credentials (safe to log)."""

    host: str
    port: int
    # 'Basic ...' from the credentials in the proxy URL; never logged.
    authorization: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def egress_proxy_for(url: str) -> EgressProxy | None:
    """The egress proxy the environment names for `url` (None: connect directly)."""
    target = URL(url)
    proxies = urllib.request.getproxies_environment()
    raw = proxies.get(target.scheme or "")
    if not raw or target.host is None:
        return None
    # Not in typeshed, but public and documented alongside getproxies_environment.
    if urllib.request.proxy_bypass_environment(target.host, proxies):  # type: ignore[attr-defined]
        return None
    proxy = URL(raw if "://" in raw else f"http://{raw}")
    if proxy.scheme != "http" or proxy.host is None:
        raise EgressError(
            f"the egress proxy for {target.scheme} ({target.scheme.upper()}_PROXY) must be an "
            f"http:// URL (host and port); got scheme '{proxy.scheme}'"
        )
    authorization = None
    if proxy.raw_user is not None:
        pair = f"{unquote(proxy.raw_user)}:{unquote(proxy.raw_password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return EgressProxy(proxy.host, proxy.port or 80, authorization)


class _ConnectReply(asyncio.Protocol):
    """Reads the egress proxy's answer to CONNECT, then stops reading until the tunnel's
    real protocol takes the transport over."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.head: asyncio.Future[bytes] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.head.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0:
            assert self.transport is not None
            self.transport.pause_reading()
            self.head.set_result(bytes(self._buffer[:end]))
        elif len(self._buffer) > MAX_REPLY_HEAD:
            self.head.set_exception(ConnectionError("an endless answer to CONNECT"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("it closed the connection"))


async def open_tunnel(
    egress: EgressProxy,
    host: str,
    port: int,
    protocol: asyncio.BaseProtocol,
    tls: ssl.SSLContext | None,
) -> None:
    """Connect `protocol` to host:port through a CONNECT tunnel of `egress`, with TLS
    inside the tunnel when `tls` is given. Raises UpstreamError naming the egress proxy;
    the caller bounds the time (appcircle.connect_timeout)."""
    loop = asyncio.get_running_loop()
    try:
        transport, reply = await loop.create_connection(
            lambda: _ConnectReply(loop), egress.host, egress.port
        )
    except OSError as err:
        raise UpstreamError(
            f"cannot connect to the egress proxy {egress} (HTTPS_PROXY / HTTP_PROXY): "
            f"{err.strerror or type(err).__name__}"
        ) from None
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if egress.authorization is not None:
        request += f"Proxy-Authorization: {egress.authorization}\r\n"
    try:
        transport.write((request + "\r\n").encode())
        head = await reply.head
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status != 200:
            raise UpstreamError(
                f"the egress proxy {egress} refused the tunnel to {authority} "
                f"({status_line or 'no status line'})"
                + ("; check the credentials in HTTPS_PROXY / HTTP_PROXY" if status == 407 else "")
            )
        if tls is None:
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            transport.resume_reading()
            return
        secure = await loop.start_tls(transport, protocol, tls, server_hostname=host)
        assert secure is not None
        # start_tls does not announce the new transport to the protocol.
        protocol.connection_made(secure)
    except (ConnectionError, UpstreamError) as err:
        transport.close()
        if isinstance(err, UpstreamError):
            raise
        raise UpstreamError(f"the egress proxy {egress} failed the tunnel: {err}") from None
    except BaseException:
        transport.close()
        raise
