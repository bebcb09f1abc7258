"""Where settings come from besides the command line: the TOML file, the environment
(`APPCIRCLE_PROXY_*`), and with no file, zero-config from the variables Appcircle's own
tools use. Flags beat the environment, which beats the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

from .addresses import parse_endpoint
from .errors import ConfigError
from .settings import Settings, check_org_id

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_LISTEN_ENV",
    "ZERO_CONFIG_API_KEY_NAME",
    "ZERO_CONFIG_API_KEY_SECRET",
    "ZERO_CONFIG_KEYS",
    "ZERO_CONFIG_SUB_ORGANIZATION",
    "refuse_ignored_zero_config",
    "settings_class",
    "zero_config_variables",
]

CONFIG_ENV: Final = "APPCIRCLE_PROXY_CONFIG"
DEFAULT_LISTEN_ENV: Final = "APPCIRCLE_PROXY_DEFAULT_LISTEN"

# Zero-config: with no file, these variables (the names Appcircle's own tools use) make one route.
ZERO_CONFIG_KEYS: Final = (
    ("APPCIRCLE_PERSONAL_ACCESS_KEY", "personal-access-key"),
    ("APPCIRCLE_PERSONAL_API_TOKEN", "personal-api-token"),
)
ZERO_CONFIG_API_KEY_NAME: Final = "APPCIRCLE_API_KEY_NAME"
ZERO_CONFIG_API_KEY_SECRET: Final = "APPCIRCLE_API_KEY_SECRET"
ZERO_CONFIG_SUB_ORGANIZATION: Final = "APPCIRCLE_SUB_ORGANIZATION"


def _secret_source(variable: str) -> dict[str, str]:
    """VARIABLE holds the secret; VARIABLE_FILE names a file holding it (the Docker and
    Kubernetes secrets convention). Empty when neither is set."""
    if os.environ.get(variable) and os.environ.get(f"{variable}_FILE"):
        raise ConfigError(f"{variable} and {variable}_FILE are both set; keep one of them")
    if os.environ.get(variable):
        return {"secret_env": variable}
    if path := os.environ.get(f"{variable}_FILE"):
        return {"secret_file": path}
    return {}


def zero_config_variables() -> list[str]:
    """The zero-config variables set in the environment, as the user named them."""
    names = [
        *(variable for variable, _kind in ZERO_CONFIG_KEYS),
        ZERO_CONFIG_API_KEY_SECRET,
    ]
    candidates = [name for variable in names for name in (variable, f"{variable}_FILE")] + [
        ZERO_CONFIG_API_KEY_NAME,
        ZERO_CONFIG_SUB_ORGANIZATION,
    ]
    return [name for name in candidates if os.environ.get(name)]


class _ZeroConfigSource(PydanticBaseSettingsSource):
    """With no config file: one credential and one route `/` from Appcircle's own variables.
    Mistakes are reported with the variables the user set, and ambiguity is refused."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        kinds = {
            kind: [name for name in (variable, f"{variable}_FILE") if os.environ.get(name)]
            for variable, kind in ZERO_CONFIG_KEYS
        }
        kinds["api-key"] = [
            name
            for name in (
                ZERO_CONFIG_API_KEY_NAME,
                ZERO_CONFIG_API_KEY_SECRET,
                f"{ZERO_CONFIG_API_KEY_SECRET}_FILE",
            )
            if os.environ.get(name)
        ]
        present = {kind: names for kind, names in kinds.items() if names}
        if len(present) > 1:
            raise ConfigError(
                "more than one kind of key is set ("
                + ", ".join(name for names in present.values() for name in names)
                + "); unset all but one, or write a config file with a route for each"
            )
        credential: dict[str, Any] | None = None
        for variable, kind in ZERO_CONFIG_KEYS:
            if source := _secret_source(variable):
                credential = {"kind": kind, **source}
        name = os.environ.get(ZERO_CONFIG_API_KEY_NAME)
        secret = _secret_source(ZERO_CONFIG_API_KEY_SECRET)
        if name and not secret:
            raise ConfigError(
                f"{ZERO_CONFIG_API_KEY_NAME} is set but not {ZERO_CONFIG_API_KEY_SECRET} (or "
                f"{ZERO_CONFIG_API_KEY_SECRET}_FILE): an API key needs its name and its secret"
            )
        if secret and not name:
            raise ConfigError(
                f"{ZERO_CONFIG_API_KEY_SECRET} is set but not {ZERO_CONFIG_API_KEY_NAME}: "
                "an API key needs its name and its secret"
            )
        if name:
            credential = {"kind": "api-key", "name": name, **secret}
        if credential is None:
            return {}
        route: dict[str, Any] = {"prefix": "/", "credential": "default"}
        if sub_organization := os.environ.get(ZERO_CONFIG_SUB_ORGANIZATION):
            try:
                route["sub_organization"] = check_org_id(sub_organization)
            except ValueError as err:
                raise ConfigError(f"{ZERO_CONFIG_SUB_ORGANIZATION}: {err}") from None
        return {"credentials": {"default": credential}, "routes": {"default": route}}


def refuse_ignored_zero_config(settings: Settings, config_file: Path) -> None:
    """A zero-config variable beside a config file would be silently ignored: refuse it,
    unless the file itself reads that variable (secret_env = "APPCIRCLE_PERSONAL_ACCESS_KEY")."""
    used = {credential.secret_env for credential in settings.credentials.values()}
    used.add(settings.server.client_token_env)
    used |= {client.token_env for client in settings.clients.values()}
    ignored = [name for name in zero_config_variables() if name not in used]
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)} set beside the config file '{config_file}', which decides "
            "the credentials and routes and would ignore it; unset it, or use it in the file "
            '(e.g. secret_env = "APPCIRCLE_PERSONAL_ACCESS_KEY")'
        )


def settings_class(
    config_file: Path | None, environment: bool = True, probe: bool = False
) -> type[Settings]:
    """Settings whose sources are: flags, then environment, then the file (or zero-config);
    without `environment`, the flags alone. For a `probe`, no credential is needed: a
    probe looks for a proxy whose key may be on its own command line alone."""

    class _Loaded(Settings):
        need_credential = not probe

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            base: PydanticBaseSettingsSource
            if not environment:
                return (init_settings,)
            if config_file is None:
                base = _ZeroConfigSource(settings_cls)
            else:
                base = TomlConfigSettingsSource(settings_cls, toml_file=config_file)
            return init_settings, env_settings, base, _DeploymentDefaults(settings_cls)

    return _Loaded


class _DeploymentDefaults(PydanticBaseSettingsSource):
    """Built-in defaults a deployment may change: the image sets DEFAULT_LISTEN_ENV to
    0.0.0.0:8787, and it stays a default, which a file, a variable or a flag beats."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        given = os.environ.get(DEFAULT_LISTEN_ENV)
        if not given:
            return {}
        try:
            return {"server": {"listen": str(parse_endpoint(given))}}
        except ValueError as err:
            raise ConfigError(f"{DEFAULT_LISTEN_ENV}: {err}") from None
