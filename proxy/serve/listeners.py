"""The listening sockets: TCP or Unix, each behind the inbound bounds (`inbound`); a Unix
socket path claimed safely and removed on exit; where a listener listens, as URLs."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..config.addresses import Endpoint, UnixSocket
from .inbound import Connections

__all__ = ["Listener", "addresses", "listen", "url_of", "why"]

log = logging.getLogger("appcircle_proxy.server")


@dataclass(frozen=True, slots=True)
class Listener:
    server: asyncio.Server
    # A Unix socket file this process created, and its identity, to remove it on exit.
    socket_file: tuple[Path, int, int] | None = None
    secure: bool = False

    def close(self) -> None:
        self.server.close()
        if self.socket_file is None:
            return
        path, device, inode = self.socket_file
        try:
            found = path.lstat()
            # Only ours: a later process may have replaced the file meanwhile.
            if (found.st_dev, found.st_ino) == (device, inode):
                path.unlink()
        except OSError:
            pass


def addresses(listeners: tuple[Listener, ...]) -> list[str]:
    return [
        url_of(sock.getsockname(), listener.secure)
        for listener in listeners
        for sock in listener.server.sockets
    ]


def url_of(address: object, secure: bool = False) -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    assert isinstance(address, tuple)
    host, port = address[0], address[1]
    scheme = "https" if secure else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def listen(
    runner: web.BaseRunner,
    connections: Connections,
    endpoint: Endpoint | UnixSocket,
    mode: int,
    reuse_port: bool,
    tls: ssl.SSLContext | None = None,
) -> tuple[Listener, ...]:
    assert runner.server is not None
    factory = connections.factory(runner.server)
    loop = asyncio.get_running_loop()
    if isinstance(endpoint, Endpoint):
        server = await loop.create_server(
            factory,
            endpoint.host,
            endpoint.port,
            reuse_address=True,
            reuse_port=reuse_port,
            ssl=tls,
        )
        return (Listener(server, secure=tls is not None),)
    path = endpoint.path
    _claim_socket_path(path)
    if mode & 0o002:
        log.warning(
            "THE UNIX SOCKET %s IS WORLD-WRITABLE (server.socket_mode %04o): every local user "
            "can use the Appcircle key(s) through it. Use 0600, or 0660 and a group.",
            path,
            mode,
        )
    # Created under a restrictive umask, so there is no moment when others could connect.
    previous = os.umask(0o777 & ~mode)
    try:
        server = await loop.create_unix_server(factory, str(path), ssl=tls)
    finally:
        os.umask(previous)
    os.chmod(path, mode)
    created = path.lstat()
    return (Listener(server, (path, created.st_dev, created.st_ino), tls is not None),)


def _claim_socket_path(path: Path) -> None:
    """Refuse a socket path another process is listening on (binding would silently take
    it over); remove a stale socket file left by a process that died."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(found.st_mode):
        raise SystemExit(
            f"appcircle-proxy: {path} exists and is not a socket; remove it or choose "
            "another path in server.listen"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("replacing the stale socket file %s (no process listens on it)", path)
        path.unlink()
        return
    except OSError as err:
        raise SystemExit(
            f"appcircle-proxy: cannot check whether another process listens on {path} "
            f"({err.strerror or type(err).__name__}); choose another path in server.listen"
        ) from None
    finally:
        probe.close()
    raise SystemExit(
        f"appcircle-proxy: another process is listening on unix:{path}; stop it, or choose "
        "another path in server.listen"
    )


def why(err: OSError) -> str:
    if isinstance(err, socket.gaierror):
        return f"the host name does not resolve ({err.strerror})"
    if isinstance(err, FileNotFoundError):
        return f"its directory does not exist ({err.strerror})"
    return err.strerror or str(err)
