"""Which environment variables the proxy reads, so that a misspelled one stops it instead of
being silently ignored: an `APPCIRCLE_PROXY_*` variable must name a setting (or be one of the
few the commands read themselves, or one the configuration reads a secret from), and a
variable close to a key variable's name is pointed out when no credential is found."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from typing import Final

from pydantic import BaseModel

from .errors import ConfigError
from .settings import ENV_PREFIX, Settings
from .sources import (
    CONFIG_ENV,
    DEFAULT_LISTEN_ENV,
    ZERO_CONFIG_API_KEY_NAME,
    ZERO_CONFIG_API_KEY_SECRET,
    ZERO_CONFIG_KEYS,
    ZERO_CONFIG_SUB_ORGANIZATION,
)

__all__ = [
    "IGNORE_ENV",
    "KNOWN_NON_SETTINGS",
    "near_key_variables",
    "refuse_unknown_setting_variables",
    "unknown_setting_variables",
]

# A comma-separated list of APPCIRCLE_PROXY_* variables that are not the proxy's settings
# (set for another tool, say) and are let through.
IGNORE_ENV: Final = "APPCIRCLE_PROXY_IGNORE"
# Read or written by the commands, not settings: the file, what `run` gives CMD and `wait`
# reads (the client token, by its name and its deprecated one), where the CI recipes
# install the proxy from, and the image's default listen address (a built-in default).
KNOWN_NON_SETTINGS: Final = frozenset(
    {
        CONFIG_ENV,
        DEFAULT_LISTEN_ENV,
        IGNORE_ENV,
        "APPCIRCLE_PROXY_URL",
        "APPCIRCLE_PROXY_CLIENT_TOKEN",
        "APPCIRCLE_PROXY_TOKEN",
        "APPCIRCLE_PROXY_SOURCE",
        "APPCIRCLE_PROXY_WHEEL",
    }
)
# The tables of several named entries: [credentials.NAME], [routes.NAME], [clients.NAME].
_NAMED: Final = {"CREDENTIALS", "ROUTES", "CLIENTS"}
_KEY_VARIABLES: Final = (
    *(name for variable, _kind in ZERO_CONFIG_KEYS for name in (variable, f"{variable}_FILE")),
    ZERO_CONFIG_API_KEY_SECRET,
    f"{ZERO_CONFIG_API_KEY_SECRET}_FILE",
    ZERO_CONFIG_API_KEY_NAME,
    ZERO_CONFIG_SUB_ORGANIZATION,
)


def _fields(model: type[BaseModel]) -> list[str]:
    return [name.upper() for name in model.model_fields]


def _entry_model(section: str) -> type[BaseModel]:
    annotation = Settings.model_fields[section.lower()].annotation
    entry: type[BaseModel] = annotation.__args__[1]  # type: ignore[union-attr]
    return entry


def _setting_names(entry_names: Iterable[str]) -> list[str]:
    """Every variable that names a setting; `entry_names` stand for NAME in the tables of
    named entries (the user's own, so that the nearest name keeps it)."""
    names = []
    for section, field in Settings.model_fields.items():
        upper = section.upper()
        names.append(ENV_PREFIX + upper)
        if upper in _NAMED:
            keys = _fields(_entry_model(upper))
            for entry in entry_names:
                names.append(f"{ENV_PREFIX}{upper}__{entry}")
                names += [f"{ENV_PREFIX}{upper}__{entry}__{key}" for key in keys]
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += [f"{ENV_PREFIX}{upper}__{key}" for key in _fields(field.annotation)]
    return names


def _names_a_setting(name: str) -> bool:
    parts = name.removeprefix(ENV_PREFIX).split("__")
    section = parts[0]
    if section.lower() not in Settings.model_fields or not all(parts):
        return False
    if len(parts) == 1:
        return True
    if section in _NAMED:
        return len(parts) == 2 or (len(parts) == 3 and parts[2] in _fields(_entry_model(section)))
    model = Settings.model_fields[section.lower()].annotation
    return (
        len(parts) == 2
        and isinstance(model, type)
        and issubclass(model, BaseModel)
        and parts[1] in _fields(model)
    )


def _nearest(name: str) -> str | None:
    """The valid name `name` most likely meant: one whose key it ends with (LISTEN,
    SERVER_LISTEN: SERVER__LISTEN), else the closest by spelling."""
    rest = name.removeprefix(ENV_PREFIX)
    parts = rest.split("__")
    entries = {parts[1]} if len(parts) > 2 and parts[1] else {"NAME"}
    candidates = [
        candidate.removeprefix(ENV_PREFIX)
        for candidate in [*_setting_names(entries), *sorted(KNOWN_NON_SETTINGS)]
    ]
    same_key = [
        candidate
        for candidate in candidates
        if "__" in candidate
        and (rest == (key := candidate.rsplit("__", 1)[1]) or rest.endswith(f"_{key}"))
    ]
    pool = same_key or candidates
    nearest = difflib.get_close_matches(rest, pool, n=1, cutoff=0.0 if same_key else 0.6)
    return ENV_PREFIX + nearest[0] if nearest else None


def unknown_setting_variables(
    environ: Mapping[str, str] = os.environ, referenced: Iterable[str | None] = ()
) -> list[str]:
    """One line for each APPCIRCLE_PROXY_* variable that names no setting, with the nearest
    valid name when there is one, and a last line on what to do; [] when all are known.
    `referenced`: variables the configuration reads a secret from (secret_env, ...)."""
    ignored = {
        name.strip().upper() for name in environ.get(IGNORE_ENV, "").split(",") if name.strip()
    } | {name.upper() for name in referenced if name}
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if (
            not upper.startswith(ENV_PREFIX)
            or upper in KNOWN_NON_SETTINGS
            or upper in ignored
            or _names_a_setting(upper)
        ):
            continue
        nearest = _nearest(upper)
        hint = f"; did you mean `{nearest}`?" if nearest else ""
        problems.append(f"`{name}`: no such setting{hint}")
    if problems:
        problems.append(
            "(config.example.toml lists the settings; a variable set for another tool can be "
            f"let through by naming it in {IGNORE_ENV}, comma-separated)"
        )
    return problems


def refuse_unknown_setting_variables(referenced: Iterable[str | None] = ()) -> None:
    """ConfigError naming every APPCIRCLE_PROXY_* variable that names no setting."""
    problems = unknown_setting_variables(referenced=referenced)
    if len(problems) == 2:  # one variable, and the note on what to do
        raise ConfigError(" ".join(problems))
    if problems:
        raise ConfigError("unknown setting variables:\n  " + "\n  ".join(problems))


def near_key_variables(environ: Mapping[str, str] = os.environ) -> list[tuple[str, str]]:
    """(set, meant) for each set variable whose name is close to a key variable's."""
    found = []
    for name in sorted(environ):
        if name in _KEY_VARIABLES or not environ[name]:
            continue
        nearest = difflib.get_close_matches(name.upper(), _KEY_VARIABLES, n=1, cutoff=0.85)
        if nearest:
            found.append((name, nearest[0]))
    return found
