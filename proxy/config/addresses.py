"""Listen addresses, parsed once: a TCP host:port or a Unix socket path; and where a local
client (a probe, `wait`, `run`'s command) reaches a proxy listening on one."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "Endpoint",
    "ProbeTarget",
    "UnixSocket",
    "is_loopback",
    "parse_endpoint",
    "probe_target",
    "reachable",
    "same_address",
]

# A wildcard listener is reached on loopback, from inside its own container or host.
LOOPBACK_FOR: Final = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}"


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """A Unix socket listen address: only local users with access to the file can connect."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


def parse_endpoint(value: str) -> Endpoint | UnixSocket:
    """ValueError, saying what to write, for anything but host:port or unix:/absolute/path."""
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"'{value}' needs an absolute path, e.g. 'unix:/run/appcircle.sock'")
        return UnixSocket(Path(path))
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f"'{value}' is not a listen address; write host:port (e.g. '127.0.0.1:8787') "
            "or unix:/path/to.sock"
        )
    return Endpoint(host, int(port))


def same_address(first: Endpoint | UnixSocket, second: Endpoint | UnixSocket) -> bool:
    """Whether two listeners would claim one socket (port 0 is a fresh port each time)."""
    if isinstance(first, Endpoint) and isinstance(second, Endpoint):
        wildcard = {"0.0.0.0", "::", ""}
        return first.port == second.port != 0 and (
            first.host == second.host or bool({first.host, second.host} & wildcard)
        )
    return first == second


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def reachable(endpoint: Endpoint) -> Endpoint:
    """Where a client on the same host reaches a listener on `endpoint`."""
    return Endpoint(LOOPBACK_FOR.get(endpoint.host, endpoint.host), endpoint.port)


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """Where a running proxy answers /_proxy/ for a local probe, and the setting that says so."""

    endpoint: Endpoint | UnixSocket
    setting: str
    # The admin listener serves /_proxy/ without a client token.
    needs_client_token: bool


def probe_target(listen: Endpoint | UnixSocket, admin: Endpoint | UnixSocket | None) -> ProbeTarget:
    """The admin listener when there is one, else the API listener; wildcards by loopback."""
    endpoint, setting = (admin, "server.admin_listen") if admin else (listen, "server.listen")
    if isinstance(endpoint, Endpoint):
        endpoint = reachable(endpoint)
    return ProbeTarget(endpoint, setting, needs_client_token=admin is None)
