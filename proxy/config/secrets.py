"""Where secrets live: inline, in an environment variable, or in a file. The models only say
where; this reads, once, after validation (skipped by `check --offline` and the probes,
which run where the deployment's secrets need not be)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from .settings import DEFAULT_CLIENT, ServerSettings, Settings, check_utf8

__all__ = [
    "Client",
    "Problem",
    "listener_tls",
    "load_listener_certificate",
    "read_client_token",
    "read_clients",
    "read_secret_file",
    "secret_problems",
]

# Where in the settings (as pydantic reports locations) and what is wrong there.
Problem = tuple[tuple[str, ...], str]


def read_secret_file(path: Path, setting: str = "secret file") -> str:
    """A secret held in a file, stripped; ValueError (naming the file, never the content)
    when it cannot be read or is empty."""
    try:
        content = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"the {setting} '{path}' is not UTF-8 text (an invalid byte at offset {err.start}); "
            "write the key as it was given to you, as plain text"
        ) from None
    except OSError as err:
        raise ValueError(
            f"the {setting} '{path}' cannot be read ({err.strerror or type(err).__name__}); "
            "check the path and its permissions"
        ) from None
    if not content:
        raise ValueError(f"the {setting} '{path}' is empty")
    return content


def _variable(name: str, setting: str, hint: str) -> None:
    value = os.environ.get(name, "")
    if not value.strip():
        raise ValueError(f"the environment variable {name} ({setting}) is not set or empty{hint}")
    check_utf8(value, f"the environment variable {name} ({setting})")


def secret_problems(settings: Settings) -> list[Problem]:
    """Every secret and file the settings point at, read once: what cannot be used."""
    problems: list[Problem] = []

    def attempt(location: tuple[str, ...], read: Callable[..., object], *args: Any) -> None:
        try:
            read(*args)
        except ValueError as err:
            problems.append((location, str(err)))

    server = settings.server
    if server.client_token_env is not None:
        attempt(("server",), _variable, server.client_token_env, "client_token_env", "")
    if server.client_token_file is not None:
        attempt(("server",), read_secret_file, server.client_token_file, "client_token_file")
    if server.tls_cert_file is not None and server.tls_key_file is not None:
        attempt(("server", "tls_cert_file"), listener_tls, server)
    for name, client in settings.clients.items():
        if client.token_env is not None:
            attempt(("clients", name), _variable, client.token_env, "token_env", "")
        if client.token_file is not None:
            attempt(("clients", name), read_secret_file, client.token_file, "token_file")
    if not problems:
        attempt(("clients",), read_clients, settings)
    ca_file = settings.appcircle.ca_file
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        problems.append(
            (
                ("appcircle", "ca_file"),
                f"the CA bundle '{ca_file}' does not exist or is not readable",
            )
        )
    for name, credential in settings.credentials.items():
        where = ("credentials", name)
        if credential.secret_env is not None:
            hint = "; export it or point secret_env at the variable that holds the key"
            attempt(where, _variable, credential.secret_env, "secret_env", hint)
        if credential.secret_file is not None:
            attempt(where, read_secret_file, credential.secret_file, "secret file")
    return problems


def read_client_token(server: ServerSettings) -> SecretStr | None:
    """The client token, from wherever it is configured (checked by `secret_problems`)."""
    if server.client_token_env is not None:
        return SecretStr(os.environ[server.client_token_env].strip())
    if server.client_token_file is not None:
        return SecretStr(read_secret_file(server.client_token_file, "client_token_file"))
    if server.client_token is not None:
        return SecretStr(server.client_token.get_secret_value().strip())
    return None


@dataclass(frozen=True, slots=True)
class Client:
    """Who a client token stands for, and the routes it may use (None: every route)."""

    name: str
    token: SecretStr = field(repr=False)
    routes: frozenset[str] | None = None


def read_clients(settings: Settings) -> tuple[Client, ...]:
    """Every client token: server.client_token as client "default", then the named clients
    (checked by `secret_problems`). Two clients with one token could not be told apart."""
    clients: list[Client] = []
    single = read_client_token(settings.server)
    if single is not None:
        clients.append(Client(DEFAULT_CLIENT, single))
    for name, named in settings.clients.items():
        if named.token_env is not None:
            token = os.environ[named.token_env].strip()
        else:
            assert named.token_file is not None
            token = read_secret_file(named.token_file, "token_file")
        routes = None if named.routes is None else frozenset(named.routes)
        clients.append(Client(name, SecretStr(token), routes))
    seen: dict[str, str] = {}
    for client in clients:
        other = seen.setdefault(client.token.get_secret_value(), client.name)
        if other != client.name:
            raise ValueError(
                f"clients '{other}' and '{client.name}' have the same token, so the proxy "
                "could not tell them apart; give each client a token of its own"
            )
    return tuple(clients)


def _no_password() -> str:
    # Without a callback, OpenSSL would prompt for an encrypted key's password on the
    # terminal; the start-up must fail with a message instead.
    return ""


def load_listener_certificate(context: ssl.SSLContext, server: ServerSettings) -> None:
    """Load the listener's certificate and key into `context`; ValueError (naming the files,
    never their content) when they cannot be used."""
    assert server.tls_cert_file is not None and server.tls_key_file is not None
    try:
        context.load_cert_chain(server.tls_cert_file, server.tls_key_file, password=_no_password)
    except (OSError, ssl.SSLError) as err:
        if isinstance(err, ssl.SSLError):
            # OpenSSL's reason (KEY_VALUES_MISMATCH, NO_START_LINE...), or its message.
            reason = err.reason or (str(err.args[-1]) if err.args else "not PEM")
        else:
            reason = err.strerror or type(err).__name__
        raise ValueError(
            f"the TLS certificate '{server.tls_cert_file}' and key '{server.tls_key_file}' "
            f"cannot be used ({reason}); give PEM files: the certificate chain (server "
            "certificate first) and its unencrypted private key"
        ) from None


def listener_tls(server: ServerSettings) -> ssl.SSLContext | None:
    """The listener's TLS context (None without TLS). SIGHUP loads the files again into the
    same context (`load_listener_certificate`), so new connections get the new certificate."""
    if server.tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_listener_certificate(context, server)
    return context
