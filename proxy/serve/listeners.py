"""The listening sockets: bound once (by the single process, or by the --workers supervisor
for all its workers to share, as gunicorn does), then served behind the inbound bounds
(`inbound`); a Unix socket path claimed safely and removed on exit; where a listener
listens, as URLs."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from ..config.addresses import Endpoint, UnixSocket
from ..config.settings import ServerSettings
from .inbound import Connections

__all__ = ["Bound", "Listener", "addresses", "bind", "listen", "url_of", "why"]

log = logging.getLogger("appcircle_proxy.server")

# asyncio's own default.
BACKLOG: Final = 100


@dataclass(frozen=True, slots=True)
class Bound:
    """The listening sockets of one address (a name may resolve to several), made before
    serving. Bound without SO_REUSEPORT, so a second instance on the address fails to bind
    whether this one runs as one process or as workers sharing these sockets."""

    sockets: tuple[socket.socket, ...]
    # A Unix socket file this process created, and its identity, to remove it on exit.
    socket_file: tuple[Path, int, int] | None = None

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
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


@dataclass(frozen=True, slots=True)
class Listener:
    server: asyncio.Server
    # What to close with it: the sockets this process bound (None: a --workers supervisor
    # owns them, and closes them when the last worker is gone).
    bound: Bound | None = None
    # Serving TLS (server.tls_cert_file): its URLs are https.
    secure: bool = False

    def close(self) -> None:
        self.server.close()
        if self.bound is not None:
            self.bound.close()


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


def bind(server: ServerSettings) -> tuple[Bound, ...]:
    """Bind the API listener and the admin one, if any; exit 2 naming the address and the
    setting when one cannot be bound (in use, say)."""
    bound: list[Bound] = []
    address, setting = server.endpoint, "--listen or server.listen"
    try:
        bound.append(_bind(server.endpoint, server.socket_mode))
        if server.admin_endpoint is not None:
            address, setting = server.admin_endpoint, "--admin-listen or server.admin_listen"
            bound.append(_bind(server.admin_endpoint, server.socket_mode))
    except (OSError, SystemExit) as err:
        for made in bound:
            made.close()
        if isinstance(err, SystemExit):  # a Unix socket path refused, already said why
            raise
        log.error("cannot listen on %s: %s; choose another with %s", address, why(err), setting)
        raise SystemExit(2) from None
    return tuple(bound)


def _bind(endpoint: Endpoint | UnixSocket, mode: int) -> Bound:
    if isinstance(endpoint, Endpoint):
        return Bound(_bind_tcp(endpoint))
    path = endpoint.path
    _claim_socket_path(path)
    if mode & 0o002:
        log.warning(
            "THE UNIX SOCKET %s IS WORLD-WRITABLE (server.socket_mode %04o): every local user "
            "can use the Appcircle key(s) through it. Use 0600, or 0660 and a group.",
            path,
            mode,
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created under a restrictive umask, so there is no moment when others could connect.
    previous = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(previous)
    os.chmod(path, mode)
    created = path.lstat()
    return Bound((sock,), (path, created.st_dev, created.st_ino))


def _bind_tcp(endpoint: Endpoint) -> tuple[socket.socket, ...]:
    """One socket per address the host resolves to, as asyncio's create_server binds."""
    found = socket.getaddrinfo(
        endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, protocol, _name, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            # Rebinding right after a restart, over connections in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return tuple(sockets)


async def listen(
    runner: web.BaseRunner,
    connections: Connections,
    bound: Bound,
    *,
    owned: bool,
    tls: ssl.SSLContext | None = None,
) -> tuple[Listener, ...]:
    """Serve on bound sockets, over TLS when given a context; `owned`: closing the listener
    closes them (and removes its socket file), as the process that bound them, not a worker
    sharing them."""
    assert runner.server is not None
    factory = connections.factory(runner.server)
    loop = asyncio.get_running_loop()
    # Room in the kernel's queue for every connection the cap admits: a burst waits there
    # to be answered (or refused with 503), not dropped to a client's SYN retry seconds later.
    backlog = max(BACKLOG, connections.limit)
    listeners = []
    for sock in bound.sockets:
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(factory, sock=sock, backlog=backlog, ssl=tls)
        else:
            server = await loop.create_server(factory, sock=sock, backlog=backlog, ssl=tls)
        listeners.append(Listener(server, secure=tls is not None))
    if owned:
        # The last one closes them all, after every server has stopped accepting.
        listeners[-1] = Listener(listeners[-1].server, bound, tls is not None)
    return tuple(listeners)


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
