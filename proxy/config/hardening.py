"""What a process that holds a key does to itself: on Linux it becomes non-dumpable before
it reads any secret, and once read, the variables a key came from leave its environment.

Non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`, as ssh-agent and gpg-agent do) closes
/proc/PID/environ, /proc/PID/mem and ptrace to every process but root's (and those with
CAP_SYS_PTRACE), including the processes of the same user; it is kept across fork (the
--workers) and dropped at exec (a command `run` starts gets a process of its own). It is
what protects the environment the process started with: removing a variable from
`os.environ` does not erase the copy the kernel shows in /proc/PID/environ. The removal
is for everything that inherits or prints the live environment (a child, a crash report).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Final

from .settings import ENV_PREFIX, Settings
from .sources import ZERO_CONFIG_API_KEY_SECRET, ZERO_CONFIG_KEYS

__all__ = ["key_variables", "make_undumpable", "secrets_in_environment", "withhold"]

# <linux/prctl.h>
PR_SET_DUMPABLE: Final = 4

# The variables taken out of os.environ, with their values: a reload reads them again.
_withheld: dict[str, str] = {}


def make_undumpable() -> str | None:
    """Make this process non-dumpable on Linux; why it could not be, or None. Elsewhere
    (macOS, Windows) there is no such switch and None is returned: see the README."""
    if sys.platform != "linux":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def key_variables(settings: Settings, environ: Iterable[str]) -> set[str]:
    """Every variable in `environ` a key or the client token may have been read from."""
    names = {variable for variable, _kind in ZERO_CONFIG_KEYS} | {ZERO_CONFIG_API_KEY_SECRET}
    names |= {f"{name}_FILE" for name in names}
    names |= {c.secret_env for c in settings.credentials.values() if c.secret_env is not None}
    if settings.server.client_token_env is not None:
        names.add(settings.server.client_token_env)
    names |= {c.token_env for c in settings.clients.values() if c.token_env is not None}
    # Settings given as APPCIRCLE_PROXY_* variables can hold secrets too (credentials, the
    # client token, or a whole section as JSON). Names are case-insensitive there.
    secret_words = ("CREDENTIALS", "SECRET", "CLIENT_TOKEN", "CLIENTS")
    names |= {
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and (
            any(word in name.upper() for word in secret_words)
            or name.upper() == f"{ENV_PREFIX}SERVER"
        )
    }
    return names


def withhold(settings: Settings) -> None:
    """Take the key variables of `settings` out of the environment (os.environ, and so the
    C library's, which children inherit); `secrets_in_environment` puts them back."""
    for name in key_variables(settings, os.environ) & set(os.environ):
        _withheld[name] = os.environ.pop(name)


@contextmanager
def secrets_in_environment() -> Iterator[None]:
    """The withheld variables back in the environment while settings and credentials are
    read from it (a start, a reload), and out of it again after."""
    os.environ.update(_withheld)
    try:
        yield
    finally:
        for name in _withheld:
            os.environ.pop(name, None)
