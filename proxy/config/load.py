"""Loading the configuration: the file checked, the sources merged and validated, the
secrets read once; every problem reported as one ConfigError a user can act on."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from .errors import ConfigError
from .secrets import secret_problems
from .settings import ENV_PREFIX, NO_CREDENTIAL, Settings
from .sources import (
    CONFIG_ENV,
    refuse_ignored_zero_config,
    settings_class,
    zero_config_variables,
)
from .variables import (
    near_key_variables,
    refuse_unknown_setting_variables,
    unknown_setting_variables,
)

__all__ = ["load_settings"]


def _describe(error: ErrorDetails, config_file: Path | None) -> str:
    location = [str(part) for part in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown setting; config.example.toml lists the valid ones"
    elif error["type"] == "missing":
        message = "required setting is missing"
    if not location:
        return message
    dotted = ".".join(location)
    zero_config = location[0] in ("credentials", "routes") and location[1:2] == ["default"]
    if config_file is None and zero_config and zero_config_variables():
        # Made by zero-config: name what the user set, not the internal setting.
        return f"{', '.join(zero_config_variables())}: {message}"
    variable = ENV_PREFIX + "__".join(location).upper()
    where = f"{config_file} or {variable}" if config_file else variable
    return f"{dotted}: {message} (set in {where})"


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    offline: bool = False,
    environment: bool = True,
    probe: bool = False,
) -> Settings:
    """Read and validate the configuration; raise ConfigError with a user-facing message.

    `config_file` defaults to $APPCIRCLE_PROXY_CONFIG; `overrides` are command-line flags,
    as nested dicts, and beat the environment. `offline` validates everything but the
    secrets, secret files and CA bundle, which need not exist here. Without `environment`,
    neither the environment nor a file is read: `overrides` are the whole configuration.
    A `probe` (health, wait: offline too) needs the addresses alone, and no credential.
    """
    offline = offline or probe
    document: dict[str, Any] = {}
    if environment and config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(
                f"config file '{config_file}' does not exist or is not a file; "
                "check --config / APPCIRCLE_PROXY_CONFIG"
            )
        try:
            with config_file.open("rb") as stream:
                document = tomllib.load(stream)
        except OSError as err:
            raise ConfigError(
                f"config file '{config_file}' cannot be read: {err.strerror}"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file '{config_file}' is not valid TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"config file '{config_file}' is not UTF-8 text (an invalid byte at offset "
                f"{err.start}); save it as UTF-8"
            ) from None
    try:
        settings = _validate(config_file, overrides, environment, probe)
    except ConfigError as err:
        if environment and unknown_setting_variables(referenced=_secret_variables(document)):
            # A misspelled variable is the likelier cause: say it first.
            try:
                refuse_unknown_setting_variables(_secret_variables(document))
            except ConfigError as unknown:
                raise ConfigError(f"{unknown}\n{err}") from None
        raise
    if environment:
        refuse_unknown_setting_variables(
            [credential.secret_env for credential in settings.credentials.values()]
            + [settings.server.client_token_env]
        )
    if not offline:
        problems = [
            _describe(_as_error(location, message), config_file)
            for location, message in secret_problems(settings)
        ]
        if problems:
            raise ConfigError(_invalid(config_file, problems))
    if config_file is not None:
        refuse_ignored_zero_config(settings, config_file)
    return settings


def _secret_variables(document: dict[str, Any]) -> list[str | None]:
    """The variables a config file reads secrets from, as written (before validation)."""
    tables = [document.get("server")]
    for named in ("credentials", "clients"):
        entries = document.get(named)
        tables += list(entries.values()) if isinstance(entries, dict) else []
    return [
        table.get(key)
        for table in tables
        if isinstance(table, dict)
        for key in ("secret_env", "client_token_env", "token_env")
        if isinstance(table.get(key), str)
    ]


def _validate(
    config_file: Path | None, overrides: dict[str, Any] | None, environment: bool, probe: bool
) -> Settings:
    try:
        return settings_class(config_file, environment, probe)(**(overrides or {}))
    except SettingsError as err:
        raise ConfigError(_undecodable(err)) from None
    except ValidationError as err:
        problems = [_describe(e, config_file) for e in err.errors(include_input=False)]
        raise ConfigError(_invalid(config_file, [_near_keys(p) for p in problems])) from None


def _near_keys(problem: str) -> str:
    """ "No credential", with any variable set whose name is close to a key variable's."""
    if not problem.startswith(NO_CREDENTIAL):
        return problem
    near = near_key_variables()
    if not near:
        return problem
    return problem + "".join(f"; {name} is set: did you mean {meant}?" for name, meant in near)


def _invalid(config_file: Path | None, problems: list[str]) -> str:
    source = f"config file '{config_file}'" if config_file else "configuration"
    return f"{source} is invalid:\n  " + "\n  ".join(problems)


def _as_error(location: tuple[str, ...], message: str) -> ErrorDetails:
    """A problem found after validation, in the shape pydantic reports its own."""
    return {"type": "value_error", "loc": location, "msg": message, "input": None}


def _undecodable(err: SettingsError) -> str:
    """pydantic-settings names the top-level field ("server"), not the variable, and never
    says what it wanted: name the variables under that field and the format."""
    field = str(err).partition('field "')[2].partition('"')[0]
    prefix = f"{ENV_PREFIX}{field.upper()}"
    variables = sorted(name for name in os.environ if name.upper().startswith(prefix)) or [
        f"{prefix}*"
    ]
    return (
        f"{', '.join(variables)}: not a value the proxy can read; a list takes a "
        'comma-separated list (a,b) or JSON (["a", "b"]), a table takes a JSON object '
        '({"key": "value"}), and any setting can be set alone as '
        f"{ENV_PREFIX}<SECTION>__<KEY>"
    )
