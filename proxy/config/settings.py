"""Configuration: the TOML file, the environment and the command line, validated once into
frozen objects. Everything a user can get wrong is caught here, at start-up."""

from __future__ import annotations

import json
import os
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PositiveFloat,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from yarl import URL

from .allow import AllowRule, RoutePolicy, parse_rule

__all__ = [
    "ENV_PREFIX",
    "CONFIG_ENV",
    "ConfigError",
    "CredentialSettings",
    "Endpoint",
    "LogSettings",
    "UnixSocket",
    "RouteSettings",
    "Settings",
    "load_settings",
    "read_secret_file",
]

ENV_PREFIX: Final = "APPCIRCLE_PROXY_"
CONFIG_ENV: Final = "APPCIRCLE_PROXY_CONFIG"

CredentialKind = Literal["personal-access-key", "personal-api-token", "api-key"]

# Zero-config: with no file, these variables (the names Appcircle's own tools use) make one route.
ZERO_CONFIG_KEYS: Final = (
    ("APPCIRCLE_PERSONAL_ACCESS_KEY", "personal-access-key"),
    ("APPCIRCLE_PERSONAL_API_TOKEN", "personal-api-token"),
)
ZERO_CONFIG_API_KEY_NAME: Final = "APPCIRCLE_API_KEY_NAME"
ZERO_CONFIG_API_KEY_SECRET: Final = "APPCIRCLE_API_KEY_SECRET"
ZERO_CONFIG_SUB_ORGANIZATION: Final = "APPCIRCLE_SUB_ORGANIZATION"

# Set while validating offline (`check --offline`, `health`): secrets, secret files and the
# CA bundle are where the deployment puts them, not necessarily here, so they are not read.
_OFFLINE: ContextVar[bool] = ContextVar("offline", default=False)


def _reads_secrets() -> bool:
    return not _OFFLINE.get()


class ConfigError(Exception):
    """A configuration the proxy cannot start with; the text is for the user, secret-free."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP listen address."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """A Unix socket listen address: only local users with access to the file can connect."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


def _parse_endpoint(value: str) -> Endpoint | UnixSocket:
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


def _parse_base_url(value: object) -> object:
    if not isinstance(value, str):
        return value
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"'{value}' is not an http(s) URL; write e.g. 'https://api.appcircle.io'")
    if url.query_string or url.fragment:
        raise ValueError(f"'{value}' must not have a query string or fragment")
    return str(url).rstrip("/")


def _list_from_env(value: object) -> object:
    # An environment variable holds a string: a JSON list, or "a,b" as oauth2-proxy and
    # Cloud SQL Auth Proxy users write it. The TOML file gives a list, which passes as is.
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(
                f"'{value}' is not a JSON list; write a comma-separated list (a,b) "
                'or JSON (["a", "b"])'
            ) from None
    return [item.strip() for item in value.split(",") if item.strip()]


# A list setting; from the environment, "a,b" or '["a", "b"]'.
StringList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_list_from_env)]

# Kept a string in the model (so an environment variable needs no JSON), checked here.
ListenAddress = Annotated[str, AfterValidator(lambda value: str(_parse_endpoint(value)))]
BaseUrl = Annotated[str, BeforeValidator(_parse_base_url)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _parse_mode(value: object) -> object:
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ValueError(f"'{value}' is not an octal file mode such as '0600'") from None
    return value


class ServerSettings(_Section):
    listen: ListenAddress = "127.0.0.1:8787"
    # For a unix: listen address; octal, as chmod takes it.
    socket_mode: Annotated[int, BeforeValidator(_parse_mode), Field(ge=0, le=0o777)] = 0o600
    # Host names (besides localhost, 127.0.0.1 and ::1) that clients may address the proxy by.
    allowed_hosts: StringList = ()
    # Browser origins (scheme://host[:port]) allowed to use the proxy, with CORS.
    allowed_origins: StringList = ()
    client_token: SecretStr | None = None
    client_token_env: str | None = None
    client_token_file: Path | None = None
    # Seconds a connection may take to send a complete request head, and may stay idle.
    header_timeout: PositiveFloat = 15.0
    # A second listener for /_proxy/ (health, readiness, metrics) alone, for probes and
    # scrapers; it has no access to the API. None: /_proxy/ is served on `listen`.
    admin_listen: ListenAddress | None = None
    # On SIGTERM/SIGINT, seconds in-flight requests get to finish.
    shutdown_timeout: float = Field(default=30.0, ge=0)
    # Obtain every route's token at start-up, so readiness turns green before traffic.
    eager: bool = True
    max_url_length: int = Field(default=8192, ge=256)
    max_header_bytes: int = Field(default=32768, ge=1024)
    max_header_count: int = Field(default=100, ge=8)
    # Client connections open at once; beyond, a new connection gets 503 and is closed.
    max_client_connections: int = Field(default=1024, ge=1)
    # Seconds a request body may make no progress before the request is cut (408), so a
    # trickling upload cannot hold an upstream connection.
    body_timeout: PositiveFloat = 30.0
    # Seconds a client may take nothing of a streamed answer (or a WebSocket message) before
    # it is disconnected, freeing its stream slot. Generous: a reader at 20 KB/s behind
    # megabytes of kernel socket buffer can leave a write waiting a minute or more.
    send_timeout: PositiveFloat = 300.0
    # Requests that may wait for an upstream connection at once; the excess gets 503 at once.
    max_pending: int = Field(default=256, ge=0)

    @field_serializer("socket_mode")
    def _octal(self, mode: int) -> str:
        return f"{mode:04o}"

    @property
    def endpoint(self) -> Endpoint | UnixSocket:
        return _parse_endpoint(self.listen)

    @property
    def admin_endpoint(self) -> Endpoint | UnixSocket | None:
        return None if self.admin_listen is None else _parse_endpoint(self.admin_listen)

    @field_validator("admin_listen")
    @classmethod
    def _admin_apart(cls, admin_listen: str | None, info: ValidationInfo) -> str | None:
        listen = info.data.get("listen")
        if listen is not None and _same_address(listen, admin_listen):
            raise ValueError(
                f"admin_listen ({admin_listen}) is the listen address ({listen}); "
                "give the admin listener a port of its own, e.g. 0.0.0.0:9090"
            )
        return admin_listen

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(host.lower().removeprefix("[").removesuffix("]") for host in hosts)

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            url = URL(origin)
            if url.scheme not in ("http", "https") or not url.host or url.raw_path not in ("", "/"):
                raise ValueError(
                    f"allowed origin '{origin}' must be scheme://host[:port], "
                    "e.g. 'http://localhost:3000'"
                )
        return tuple(origin.rstrip("/").lower() for origin in origins)

    @model_validator(mode="after")
    def _client_token_source(self) -> ServerSettings:
        given = [
            name
            for name in ("client_token", "client_token_env", "client_token_file")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise ValueError(f"set at most one of {', '.join(given)}")
        if not _reads_secrets():
            return self
        if self.client_token_env is not None:
            if not os.environ.get(self.client_token_env):
                raise ValueError(
                    f"the environment variable {self.client_token_env} (client_token_env) is "
                    "not set or empty"
                )
            _check_utf8(
                os.environ[self.client_token_env],
                f"the environment variable {self.client_token_env} (client_token_env)",
            )
        if self.client_token is not None:
            _check_utf8(self.client_token.get_secret_value(), "client_token")
        if self.client_token_file is not None:
            read_secret_file(self.client_token_file, "client_token_file")
        return self

    def client_secret(self) -> SecretStr | None:
        """The client token, read from wherever it is configured (validated above)."""
        if self.client_token_env is not None:
            return SecretStr(os.environ[self.client_token_env].strip())
        if self.client_token_file is not None:
            return SecretStr(read_secret_file(self.client_token_file, "client_token_file"))
        if self.client_token is not None:
            return SecretStr(self.client_token.get_secret_value().strip())
        return None


def _check_utf8(value: str, where: str) -> None:
    """The environment hands undecodable bytes over as surrogates, which no HTTP request can
    carry; refuse them here, naming where the value came from and never the value."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where} is not valid UTF-8 (an invalid byte at position {err.start}); "
            "set it to the key exactly as it was given to you"
        ) from None


def _same_address(listen: str, admin_listen: str | None) -> bool:
    """Whether the two listeners would claim one socket (port 0 is a fresh port each time)."""
    if admin_listen is None:
        return False
    first, second = _parse_endpoint(listen), _parse_endpoint(admin_listen)
    if isinstance(first, Endpoint) and isinstance(second, Endpoint):
        wildcard = {"0.0.0.0", "::", ""}
        return first.port == second.port != 0 and (
            first.host == second.host or bool({first.host, second.host} & wildcard)
        )
    return first == second


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


class AppcircleSettings(_Section):
    api_url: BaseUrl = "https://api.appcircle.io"
    auth_url: BaseUrl = "https://auth.appcircle.io"
    ca_file: Path | None = None
    connect_timeout: PositiveFloat = 10.0
    read_timeout: PositiveFloat = 300.0
    # Upstream connections for ordinary API calls (a keep-alive pool); requests beyond wait
    # up to pool_timeout seconds, then get 503.
    max_connections: int = Field(default=100, ge=1)
    pool_timeout: PositiveFloat = 5.0
    # A separate budget for long-lived streams (WebSockets, server-sent events, bodies
    # streamed rather than buffered), so they can never starve short API calls.
    max_streams: int = Field(default=100, ge=1)
    # What the API may send besides a body, in bytes: the status line and each header line
    # (aiohttp's own limit), a whole response head, and a chunked body's extensions and
    # trailers in a row. Past them: 502 upstream_bad_response, the connection dropped.
    max_response_line: int = Field(default=8190, ge=64)
    max_response_head: int = Field(default=64 * 1024, ge=256)
    max_response_trailers: int = Field(default=64 * 1024, ge=256)
    # Turns off TLS verification for the auth and API hosts. Logged loudly; prefer ca_file.
    insecure_skip_verify: bool = False

    @field_validator("ca_file")
    @classmethod
    def _ca_file_readable(cls, path: Path | None) -> Path | None:
        if path is not None and _reads_secrets() and not os.access(path, os.R_OK):
            raise ValueError(f"the CA bundle '{path}' does not exist or is not readable")
        return path

    @model_validator(mode="after")
    def _one_way_to_trust(self) -> AppcircleSettings:
        if self.ca_file is not None and self.insecure_skip_verify:
            raise ValueError(
                "set ca_file or insecure_skip_verify, not both; ca_file is the safe one"
            )
        return self


class TokenSettings(_Section):
    # None: 5 minutes or a fifth of the token's lifetime, whichever is smaller.
    refresh_margin: PositiveFloat | None = None
    retry_initial: PositiveFloat = 1.0
    retry_max: PositiveFloat = 60.0
    # The backoff's ceiling while a route holds no valid token (its requests are failing),
    # so it recovers within seconds of the auth host's return. Never above retry_max.
    retry_max_without_token: PositiveFloat = 2.0
    exchange_timeout: PositiveFloat = 10.0
    # The longest a request waits for a token exchange before it gets 503.
    wait_timeout: PositiveFloat = 5.0
    # A 401 from the API renews a route's token at most this often (seconds), so an
    # endpoint that refuses every token cannot turn each request into an exchange.
    min_renew_interval: float = Field(default=5.0, ge=0)
    replay_limit: int = Field(default=64 * 1024, ge=0)

    @model_validator(mode="after")
    def _retry_order(self) -> TokenSettings:
        if self.retry_max < self.retry_initial:
            raise ValueError("retry_max must not be smaller than retry_initial")
        return self


class LogSettings(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Query strings can carry ids and search terms; access log lines omit them by default.
    query_strings: bool = False


class CredentialSettings(_Section):
    kind: CredentialKind
    secret: SecretStr | None = None
    secret_env: str | None = None
    secret_file: Path | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CredentialSettings:
        given = [f for f in ("secret", "secret_env", "secret_file") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of secret, secret_env (a variable's name) or secret_file "
                f"(a path); found {len(given)}" + (f": {', '.join(given)}" if given else "")
            )
        if self.secret is not None:
            if not self.secret.get_secret_value().strip():
                raise ValueError("secret is empty")
            _check_utf8(self.secret.get_secret_value(), "secret")
        if self.kind == "api-key" and not self.name:
            raise ValueError("an api-key credential needs name (the API key's name)")
        if self.kind != "api-key" and self.name is not None:
            raise ValueError(f"name is only for api-key credentials, not {self.kind}")
        if not _reads_secrets():
            return self
        if self.secret_env is not None:
            if not os.environ.get(self.secret_env, "").strip():
                raise ValueError(
                    f"the environment variable {self.secret_env} (secret_env) is not set or "
                    "empty; export it or point secret_env at the variable that holds the key"
                )
            _check_utf8(os.environ[self.secret_env], f"the environment variable {self.secret_env}")
        if self.secret_file is not None:
            read_secret_file(self.secret_file, "secret file")
        return self


def _normalise_prefix(value: object) -> object:
    if not isinstance(value, str):
        return value
    if not value.startswith("/"):
        raise ValueError(f"prefix '{value}' must start with '/'")
    if any(c in value for c in "?#\\") or "//" in value:
        raise ValueError(f"prefix '{value}' must be a plain path such as '/eu'")
    return value.rstrip("/") or "/"


def _check_org_id(value: object) -> object:
    if value is None or not isinstance(value, str):
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(
            f"sub_organization '{value}' is not an organization id; copy the GUID "
            "(e.g. 3fa85f64-5717-4562-b3fc-2c963f66afa6) from the organization's settings"
        ) from None


def _parse_allow_rule(value: object) -> AllowRule:
    if isinstance(value, AllowRule):
        return value
    if not isinstance(value, str):
        raise ValueError('each rule is a string such as "GET /build/**"')
    return parse_rule(value)


# Parsed into frozen rules here; printed back as the strings they were written as.
AllowRuleSetting = Annotated[AllowRule, PlainValidator(_parse_allow_rule), PlainSerializer(str)]


class RouteSettings(_Section):
    prefix: Annotated[str, BeforeValidator(_normalise_prefix)]
    credential: str
    sub_organization: Annotated[str | None, BeforeValidator(_check_org_id)] = None
    # Least privilege: when set, only requests matching one of these rules pass (403 else).
    allow: tuple[AllowRuleSetting, ...] | None = None
    # GET, HEAD and OPTIONS only (with `allow`, both must let a request through).
    read_only: bool = False

    @field_validator("allow", mode="before")
    @classmethod
    def _allow_is_a_list(cls, rules: object) -> object:
        if isinstance(rules, str):
            raise ValueError(f'allow is a list of rules: allow = ["{rules}"]')
        return rules

    @field_validator("allow")
    @classmethod
    def _allow_not_empty(cls, rules: tuple[AllowRule, ...] | None) -> tuple[AllowRule, ...] | None:
        if rules is not None and not rules:
            raise ValueError(
                "allow is empty, so the route would refuse every request; list rules such as "
                '"GET /build/**", or remove allow to let everything through'
            )
        return rules

    @property
    def policy(self) -> RoutePolicy:
        return RoutePolicy(self.allow, self.read_only)


class Settings(BaseSettings):
    """The whole configuration, as the proxy runs with it."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    server: ServerSettings = ServerSettings()
    appcircle: AppcircleSettings = AppcircleSettings()
    tokens: TokenSettings = TokenSettings()
    log: LogSettings = LogSettings()
    credentials: dict[str, CredentialSettings] = {}
    routes: dict[str, RouteSettings] = {}

    @model_validator(mode="before")
    @classmethod
    def _default_route(cls, data: Any) -> Any:
        # A one-key setup needs no routing table: its key serves every path.
        if isinstance(data, dict) and not data.get("routes"):
            credentials = data.get("credentials")
            if isinstance(credentials, dict) and len(credentials) == 1:
                (only,) = credentials
                return {**data, "routes": {"default": {"prefix": "/", "credential": only}}}
        return data

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        if not self.credentials:
            raise ValueError(
                "no credential is configured; add a [credentials.NAME] section, or with no "
                "config file set APPCIRCLE_PERSONAL_ACCESS_KEY (or APPCIRCLE_PERSONAL_API_TOKEN, "
                "or APPCIRCLE_API_KEY_NAME and APPCIRCLE_API_KEY_SECRET)"
            )
        if not self.routes:
            raise ValueError(
                "several credentials but no [routes.NAME]; add routes that say which "
                "credential serves which prefix"
            )
        seen: dict[str, str] = {}
        for name, route in self.routes.items():
            if route.credential not in self.credentials:
                raise ValueError(
                    f"routes.{name}.credential names '{route.credential}', which is not "
                    f"defined; defined credentials: {', '.join(sorted(self.credentials))}"
                )
            if route.prefix in seen:
                raise ValueError(
                    f"routes.{seen[route.prefix]} and routes.{name} have the same prefix "
                    f"'{route.prefix}'; give each route its own prefix"
                )
            seen[route.prefix] = name
        return self


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


def _zero_config_variables() -> list[str]:
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
                route["sub_organization"] = _check_org_id(sub_organization)
            except ValueError as err:
                raise ConfigError(f"{ZERO_CONFIG_SUB_ORGANIZATION}: {err}") from None
        return {"credentials": {"default": credential}, "routes": {"default": route}}


def _refuse_ignored_zero_config(settings: Settings, config_file: Path) -> None:
    """A zero-config variable beside a config file would be silently ignored: refuse it,
    unless the file itself reads that variable (secret_env = "APPCIRCLE_PERSONAL_ACCESS_KEY")."""
    used = {credential.secret_env for credential in settings.credentials.values()}
    used.add(settings.server.client_token_env)
    ignored = [name for name in _zero_config_variables() if name not in used]
    if ignored:
        raise ConfigError(
            f"{', '.join(ignored)} set beside the config file '{config_file}', which decides "
            "the credentials and routes and would ignore it; unset it, or use it in the file "
            '(e.g. secret_env = "APPCIRCLE_PERSONAL_ACCESS_KEY")'
        )


def _settings_class(config_file: Path | None, environment: bool = True) -> type[Settings]:
    """Settings whose sources are: flags, then environment, then the file (or zero-config);
    without `environment`, the flags alone."""

    class _Loaded(Settings):
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
            return init_settings, env_settings, base

    return _Loaded


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
    if config_file is None and zero_config and _zero_config_variables():
        # Made by zero-config: name what the user set, not the internal setting.
        return f"{', '.join(_zero_config_variables())}: {message}"
    variable = ENV_PREFIX + "__".join(location).upper()
    where = f"{config_file} or {variable}" if config_file else variable
    return f"{dotted}: {message} (set in {where})"


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    offline: bool = False,
    environment: bool = True,
) -> Settings:
    """Read and validate the configuration; raise ConfigError with a user-facing message.

    `config_file` defaults to $APPCIRCLE_PROXY_CONFIG; `overrides` are command-line flags,
    as nested dicts, and beat the environment. `offline` validates everything but the
    secrets, secret files and CA bundle, which need not exist here. Without `environment`,
    neither the environment nor a file is read: `overrides` are the whole configuration.
    """
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
                tomllib.load(stream)
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
    with _offline(offline):
        try:
            settings = _settings_class(config_file, environment)(**(overrides or {}))
        except SettingsError as err:
            raise ConfigError(_undecodable(err)) from None
        except ValidationError as err:
            problems = [_describe(e, config_file) for e in err.errors(include_input=False)]
            source = f"config file '{config_file}'" if config_file else "configuration"
            raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(problems)) from None
    if config_file is not None:
        _refuse_ignored_zero_config(settings, config_file)
    return settings


@contextmanager
def _offline(offline: bool) -> Iterator[None]:
    reset = _OFFLINE.set(offline)
    try:
        yield
    finally:
        _OFFLINE.reset(reset)


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
