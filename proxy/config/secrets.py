"""Where secrets live: inline, in an environment variable, or in a file. The models only say
where; this reads, once, after validation (skipped by `check --offline` and the probes,
which run where the deployment's secrets need not be)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from .settings import ServerSettings, Settings, check_utf8

__all__ = ["Problem", "read_client_token", "read_secret_file", "secret_problems"]

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
