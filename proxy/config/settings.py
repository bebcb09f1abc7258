"""The configuration's models: what each setting may hold, validated into frozen objects.
Pure data: nothing here reads a file or the environment (`sources` and `secrets` do, and
`load` puts them together)."""

from __future__ import annotations

import json
import re
import uuid
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal

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
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    SettingsConfigDict,
)
from yarl import URL

from .addresses import Endpoint, UnixSocket, parse_endpoint, same_address
from .allow import AllowRule, RoutePolicy, parse_rule

__all__ = [
    "ENV_PREFIX",
    "DEFAULT_LISTEN",
    "NO_CREDENTIAL",
    "AppcircleSettings",
    "DEFAULT_CLIENT",
    "ClientSettings",
    "CredentialSettings",
    "LogSettings",
    "RouteSettings",
    "ServerSettings",
    "Settings",
    "TokenSettings",
    "check_org_id",
    "check_utf8",
]

ENV_PREFIX: Final = "APPCIRCLE_PROXY_"
NO_CREDENTIAL: Final = "no credential is configured"

CredentialKind = Literal["personal-access-key", "personal-api-token", "api-key"]


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
ListenAddress = Annotated[str, AfterValidator(lambda value: str(parse_endpoint(value)))]
BaseUrl = Annotated[str, BeforeValidator(_parse_base_url)]


def check_utf8(value: str, where: str) -> None:
    """The environment hands undecodable bytes over as surrogates, which no HTTP request can
    carry; refuse them, naming where the value came from and never the value."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where} is not valid UTF-8 (an invalid byte at position {err.start}); "
            "set it to the key exactly as it was given to you"
        ) from None


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _parse_mode(value: object) -> object:
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ValueError(f"'{value}' is not an octal file mode such as '0600'") from None
    return value


# The listen address when no flag, variable or file sets one (an image may lower its own
# default into the sources: see `sources.DEFAULT_LISTEN_ENV`).
DEFAULT_LISTEN: Final = "127.0.0.1:8787"


class ServerSettings(_Section):
    listen: ListenAddress = DEFAULT_LISTEN
    # For a unix: listen address; octal, as chmod takes it.
    socket_mode: Annotated[int, BeforeValidator(_parse_mode), Field(ge=0, le=0o777)] = 0o600
    # Host names (besides localhost, 127.0.0.1 and ::1) that clients may address the proxy by.
    allowed_hosts: StringList = ()
    # Browser origins (scheme://host[:port]) allowed to use the proxy, with CORS.
    allowed_origins: StringList = ()
    client_token: SecretStr | None = None
    client_token_env: str | None = None
    client_token_file: Path | None = None
    # TLS on the listener (both or neither), for traffic that leaves the machine or the pod;
    # the files are re-read on SIGHUP (new connections get the new certificate).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
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

    @cached_property
    def endpoint(self) -> Endpoint | UnixSocket:
        return parse_endpoint(self.listen)

    @cached_property
    def admin_endpoint(self) -> Endpoint | UnixSocket | None:
        return None if self.admin_listen is None else parse_endpoint(self.admin_listen)

    @field_validator("admin_listen")
    @classmethod
    def _admin_apart(cls, admin_listen: str | None, info: ValidationInfo) -> str | None:
        listen = info.data.get("listen")
        if (
            listen is not None
            and admin_listen is not None
            and same_address(parse_endpoint(listen), parse_endpoint(admin_listen))
        ):
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
        if self.client_token is not None:
            check_utf8(self.client_token.get_secret_value(), "client_token")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given, missing = (
                ("tls_cert_file", "tls_key_file")
                if self.tls_key_file is None
                else ("tls_key_file", "tls_cert_file")
            )
            raise ValueError(
                f"{given} is set but {missing} is not; TLS on the listener needs both "
                "(the certificate chain and its private key, PEM files), or neither"
            )
        return self


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
    # The largest share of max_connections (and of server.max_pending) that calls to one
    # flow (a route and API resource, e.g. build/v1/commits) may hold, so one slow path
    # cannot starve the others. 1: no per-flow cap.
    flow_share: float = Field(default=0.5, gt=0, le=1)
    # What the API may send besides a body, in bytes: the status line and each header line
    # (aiohttp's own limit), a whole response head, and a chunked body's extensions and
    # trailers in a row. Past them: 502 upstream_bad_response, the connection dropped.
    max_response_line: int = Field(default=8190, ge=64)
    max_response_head: int = Field(default=64 * 1024, ge=256)
    max_response_trailers: int = Field(default=64 * 1024, ge=256)
    # Turns off TLS verification for the auth and API hosts. Logged loudly; prefer ca_file.
    insecure_skip_verify: bool = False
    # Appcircle's MCP server, for routes with upstream = "mcp".
    mcp_url: BaseUrl = "https://mcp.appcircle.io"

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
    # While a route holds no valid token, an exchange with no answer after this many seconds
    # gets a second one started beside it (hedging), so a hung one cannot hold recovery.
    hedge_after: PositiveFloat = 1.0
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
            check_utf8(self.secret.get_secret_value(), "secret")
        if self.kind == "api-key" and not self.name:
            raise ValueError("an api-key credential needs name (the API key's name)")
        if self.kind != "api-key" and self.name is not None:
            raise ValueError(f"name is only for api-key credentials, not {self.kind}")
        return self


# A client's name goes into log lines and metric labels: keep it plain.
CLIENT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# server.client_token, when named clients are configured too.
DEFAULT_CLIENT: Final = "default"


class ClientSettings(_Section):
    """A named client of a shared proxy: its own token, and optionally the routes it may use."""

    token_env: str | None = None
    token_file: Path | None = None
    # Route names (the [routes.NAME] keys); None: every route.
    routes: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _one_token_source(self) -> ClientSettings:
        given = [f for f in ("token_env", "token_file") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of token_env (a variable's name) or token_file (a path); "
                f"found {len(given)}" + (f": {', '.join(given)}" if given else "")
            )
        if self.routes is not None and not self.routes:
            raise ValueError(
                "routes is empty, so the client could use nothing; list route names, or "
                "remove routes to let it use every route"
            )
        return self


def _normalise_prefix(value: object) -> object:
    if not isinstance(value, str):
        return value
    if not value.startswith("/"):
        raise ValueError(f"prefix '{value}' must start with '/'")
    if any(c in value for c in "?#\\") or "//" in value:
        raise ValueError(f"prefix '{value}' must be a plain path such as '/eu'")
    return value.rstrip("/") or "/"


def check_org_id(value: object) -> object:
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


def _parse_upstream(value: object) -> object:
    if value in ("api", "mcp") or not isinstance(value, str):
        return value
    try:
        return _parse_base_url(value)
    except ValueError:
        raise ValueError(
            f'upstream \'{value}\' is not "api", "mcp" or an http(s) URL of an Appcircle service'
        ) from None


class RouteSettings(_Section):
    prefix: Annotated[str, BeforeValidator(_normalise_prefix)]
    credential: str
    sub_organization: Annotated[str | None, BeforeValidator(check_org_id)] = None
    # Least privilege: when set, only requests matching one of these rules pass (403 else).
    allow: tuple[AllowRuleSetting, ...] | None = None
    # GET, HEAD and OPTIONS only (with `allow`, both must let a request through).
    read_only: bool = False
    # Where the route goes: "api" (appcircle.api_url), "mcp" (appcircle.mcp_url) or a URL.
    upstream: Annotated[str, BeforeValidator(_parse_upstream)] = "api"
    # MCP tools (glob patterns) agents may call through this route; None: every tool.
    mcp_tools: StringList | None = None

    @model_validator(mode="after")
    def _mcp_tools_need_an_mcp_upstream(self) -> RouteSettings:
        if self.mcp_tools is not None and self.upstream == "api":
            raise ValueError(
                'mcp_tools applies to a route to an MCP server: set upstream = "mcp" (or the '
                "server's URL), or remove mcp_tools"
            )
        if self.mcp_tools is not None and not self.mcp_tools:
            raise ValueError(
                'mcp_tools is empty, so no tool could be called; list patterns such as "list_*"'
            )
        return self

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
    # Named clients, each with its own client token (see the README's "Shared deployment").
    clients: dict[str, ClientSettings] = {}
    # False for the probes (health, wait), which need the addresses alone.
    need_credential: ClassVar[bool] = True

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
        if not self.credentials and self.need_credential:
            raise ValueError(
                f"{NO_CREDENTIAL}; add a [credentials.NAME] section, or with no "
                "config file set APPCIRCLE_PERSONAL_ACCESS_KEY (or APPCIRCLE_PERSONAL_API_TOKEN, "
                "or APPCIRCLE_API_KEY_NAME and APPCIRCLE_API_KEY_SECRET)"
            )
        if self.credentials and not self.routes:
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
        self._check_clients()
        return self

    def _check_clients(self) -> None:
        server = self.server
        single = any(
            value is not None
            for value in (server.client_token, server.client_token_env, server.client_token_file)
        )
        for name, client in self.clients.items():
            if not CLIENT_NAME.fullmatch(name):
                raise ValueError(
                    f"clients.{name}: a client's name is letters, digits, '_', '.' and '-' "
                    "(it goes into log lines and metric labels), at most 63 characters"
                )
            if name == DEFAULT_CLIENT and single:
                raise ValueError(
                    f"clients.{DEFAULT_CLIENT}: with server.client_token (or client_token_env "
                    f"/ client_token_file) set, '{DEFAULT_CLIENT}' is that token's name; "
                    "give this client another name"
                )
            unknown = [route for route in client.routes or () if route not in self.routes]
            if unknown:
                raise ValueError(
                    f"clients.{name}.routes names {', '.join(repr(r) for r in unknown)}, "
                    f"which is not a route; defined routes: {', '.join(sorted(self.routes))}"
                )
