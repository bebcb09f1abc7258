"""Configuration: each mistake stops the command with exit 2 and one clear,
secret-free line; the file, the environment and zero-config variables."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import tomli_w

from proxy.cli.main import main
from proxy.config.addresses import Endpoint
from proxy.config.errors import ConfigError
from proxy.config.load import load_settings

from .conftest import (
    PERSONAL_KEY,
    PERSONAL_KEY_CONFIG,
    SUB_ORG,
    WriteConfig,
)
from .support.processes import run


def run_config_command(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["config", "--config", str(path)])
    return code, capsys.readouterr().err


ROOT = Path(__file__).parent.parent


INLINE_SECRET = "pak_inline_value_that_must_never_be_printed"


GOOD = """
[credentials.main]
kind = "personal-access-key"
secret_env = "TEST_APPCIRCLE_KEY"
"""


def config_error(tmp_path: Path, text: str | None, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `appcircle-proxy check` on a config; assert exit 2 and return the message."""
    args = ["check"]
    if text is not None:
        path = tmp_path / "proxy.toml"
        path.write_text(text)
        args += ["--config", str(path)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    assert INLINE_SECRET not in err
    return err


def test_a_config_file_that_is_not_utf8_exits_2_with_one_line(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config file that is not UTF-8 makes `config` exit 2 with one line saying so, not a
    traceback."""
    path = write_config()
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    code, err = run_config_command(path, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "is not UTF-8" in err and "Traceback" not in err


def test_a_secret_file_that_is_not_utf8_exits_2_without_the_secret(
    write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret_file that is not UTF-8 makes `config` exit 2 naming the file, without printing the
    secret or a traceback."""
    secret = tmp_path / "key"
    secret.write_bytes(PERSONAL_KEY.encode() + b"\xff")
    path = write_config(
        credentials={"main": {"kind": "personal-access-key", "secret_file": str(secret)}}
    )
    code, err = run_config_command(path, capsys)
    assert code == 2
    assert "is not UTF-8" in err and str(secret) in err
    assert PERSONAL_KEY not in err and "Traceback" not in err


@pytest.mark.parametrize("setting", ["secret_env", "client_token_env"])
def test_a_secret_in_the_environment_that_is_not_utf8_exits_2_without_the_secret(
    setting: str,
    write_config: WriteConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A secret_env or client_token_env variable that is not valid UTF-8 makes `config` exit 2
    naming the variable, without printing the secret, a traceback or any warning."""
    # What Python makes of the byte 0xff in an environment variable.
    monkeypatch.setenv("TEST_BAD_SECRET", PERSONAL_KEY + os.fsdecode(b"\xff"))
    if setting == "secret_env":
        path = write_config(
            credentials={"main": {"kind": "personal-access-key", "secret_env": "TEST_BAD_SECRET"}}
        )
    else:
        path = write_config(server={"client_token_env": "TEST_BAD_SECRET"})
    code, err = run_config_command(path, capsys)
    assert code == 2
    assert "TEST_BAD_SECRET" in err and "not valid UTF-8" in err
    assert PERSONAL_KEY not in err and "Traceback" not in err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_list_setting_in_the_environment_takes_commas_or_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A list setting such as APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS takes a comma-separated list or
    a JSON array from the environment, with host names lower-cased."""
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "pak_example")
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS", "appcircle-proxy, Proxy.Internal")
    assert load_settings().server.allowed_hosts == ("appcircle-proxy", "proxy.internal")
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS", '["appcircle-proxy"]')
    assert load_settings().server.allowed_hosts == ("appcircle-proxy",)
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__ALLOWED_ORIGINS", "http://localhost:3000")
    assert load_settings().server.allowed_origins == ("http://localhost:3000",)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("APPCIRCLE_PROXY_SERVER__ALLOWED_HOSTS", '["a", ', "comma-separated list (a,b) or JSON"),
        ("APPCIRCLE_PROXY_ROUTES", "{not json", "a table takes a JSON object"),
    ],
)
def test_an_unreadable_environment_value_names_the_variable_and_the_format(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    """An environment value that cannot be parsed raises a ConfigError naming the variable and the
    expected format, not pydantic's internal EnvSettingsSource."""
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "pak_example")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert variable in message and expected in message
    assert "EnvSettingsSource" not in message


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"APPCIRCLE_API_KEY_SECRET": "s"}, "APPCIRCLE_API_KEY_NAME"),
        ({"APPCIRCLE_API_KEY_NAME": "bot"}, "APPCIRCLE_API_KEY_SECRET"),
        (
            {"APPCIRCLE_PERSONAL_ACCESS_KEY": "k", "APPCIRCLE_SUB_ORGANIZATION": "eu"},
            "APPCIRCLE_SUB_ORGANIZATION",
        ),
        (
            {"APPCIRCLE_PERSONAL_ACCESS_KEY_FILE": "/no/such/key"},
            "APPCIRCLE_PERSONAL_ACCESS_KEY_FILE",
        ),
    ],
)
def test_zero_config_mistakes_name_the_variables_the_user_set(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    """A half-set or wrong zero-config environment (API key name without secret, sub-organization
    with a personal key, a missing key file) names the APPCIRCLE_ variable, not APPCIRCLE_PROXY_
    ones."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert named in str(raised.value)
    assert "APPCIRCLE_PROXY_" not in str(raised.value)


@pytest.mark.parametrize(
    "variables",
    [
        {"APPCIRCLE_PERSONAL_ACCESS_KEY": "k", "APPCIRCLE_PERSONAL_API_TOKEN": "t"},
        {"APPCIRCLE_PERSONAL_ACCESS_KEY": "k", "APPCIRCLE_API_KEY_NAME": "b"},
        {"APPCIRCLE_PERSONAL_API_TOKEN": "t", "APPCIRCLE_API_KEY_SECRET_FILE": "/s"},
        {"APPCIRCLE_PERSONAL_ACCESS_KEY": "k", "APPCIRCLE_PERSONAL_ACCESS_KEY_FILE": "/k"},
    ],
)
def test_two_keys_at_once_are_refused_in_one_line_naming_both(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    """Two zero-config keys set at once are refused with a one-line ConfigError naming both
    variables, instead of one silently winning."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert "\n" not in message
    for name in variables:
        assert name in message


def test_zero_config_variables_beside_a_config_file_are_refused_unless_it_uses_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An APPCIRCLE_ zero-config variable set beside a config file is refused unless the file names
    it (as a secret_env), so the user is never unsure which key is in use."""
    config = tmp_path / "proxy.toml"
    config.write_text(tomli_w.dumps({"credentials": PERSONAL_KEY_CONFIG}))  # TEST_APPCIRCLE_KEY
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "pak_other")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert "APPCIRCLE_PERSONAL_ACCESS_KEY set beside the config file" in str(raised.value)
    uses_it = {
        "main": {"kind": "personal-access-key", "secret_env": "APPCIRCLE_PERSONAL_ACCESS_KEY"}
    }
    config.write_text(tomli_w.dumps({"credentials": uses_it}))
    assert load_settings(config).credentials["main"].secret_env == "APPCIRCLE_PERSONAL_ACCESS_KEY"
    monkeypatch.setenv("APPCIRCLE_SUB_ORGANIZATION", "x")
    with pytest.raises(ConfigError, match="APPCIRCLE_SUB_ORGANIZATION set beside"):
        load_settings(config)


async def test_admin_listen_on_the_listen_address_is_refused_at_validation(
    write_config: WriteConfig,
) -> None:
    """server.admin_listen on the same port as server.listen is refused by `config` with exit 2 and
    a message naming both, before anything tries to bind."""
    config = str(write_config())
    args = ("--listen", "0.0.0.0:8999", "--admin-listen", "127.0.0.1:8999")
    code, _, err = await run("config", "--config", config, *args)
    assert code == 2
    assert "server.admin_listen: admin_listen (127.0.0.1:8999) is the listen address" in err


async def test_check_offline_validates_a_deployment_config_without_its_secrets(
    tmp_path: Path,
) -> None:
    """`check --offline` validates config.example.toml without its secrets, saying where each secret
    will come from; online `check` needs them, and a structural error still exits 2 offline."""
    config = tmp_path / "deploy.toml"
    config.write_text((ROOT / "config.example.toml").read_text())  # its secrets are not here
    code, out, err = await run("check", "--offline", "--config", str(config))
    assert code == 0, err
    assert "configuration is valid" in out
    assert "credentials.me: variable APPCIRCLE_PERSONAL_ACCESS_KEY" in out
    assert "credentials.ci: file /run/secrets/appcircle-api-key" in out
    code, out, err = await run("check", "--config", str(config))
    assert code == 2  # online, the secrets must be there
    config.write_text('[credentials.main]\nkind = "api-key"\nsecret_env = "X"\n')
    code, _, err = await run("check", "--offline", "--config", str(config))
    assert code == 2 and "needs name" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[credentials.main\nkind = 1", ["not valid TOML", "line 1"]),
        (
            '[credentials.main]\nkind = "password"\nsecret = "x"',
            [
                "credentials.main.kind",
                "'personal-access-key'",
                "APPCIRCLE_PROXY_CREDENTIALS__MAIN__KIND",
            ],
        ),
        (
            GOOD + '[routes.eu]\nprefix = "/eu"\ncredential = "missing"',
            ["routes.eu.credential", "'missing'", "defined credentials: main"],
        ),
        (
            GOOD
            + '[routes.a]\nprefix = "/eu"\ncredential = "main"\n'
            + '[routes.b]\nprefix = "/eu/"\ncredential = "main"',
            ["routes.a and routes.b", "same prefix '/eu'"],
        ),
        (
            '[credentials.main]\nkind = "personal-access-key"\nsecret_env = "NOT_SET_ANYWHERE"',
            ["credentials.main", "NOT_SET_ANYWHERE", "not set"],
        ),
        (
            '[credentials.main]\nkind = "personal-access-key"\nsecret_file = "/no/such/key"',
            ["credentials.main", "'/no/such/key'", "cannot be read"],
        ),
        ("", ["no credential is configured", "APPCIRCLE_PERSONAL_ACCESS_KEY"]),
        (
            f'[credentials.main]\nkind = "personal-access-key"\nsecret = "{INLINE_SECRET}"\n'
            '[routes.x]\nprefix = "eu"\ncredential = "main"',
            ["routes.x.prefix", "must start with '/'"],
        ),
        (
            f'[credentials.main]\nkind = "api-key"\nsecret = "{INLINE_SECRET}"',
            ["api-key credential needs name"],
        ),
        (
            f'[credentials.main]\nkind = "personal-access-key"\nsecret = "{INLINE_SECRET}"\n'
            'secret_env = "TEST_APPCIRCLE_KEY"',
            ["exactly one of secret, secret_env", "secret, secret_env"],
        ),
        (
            GOOD + '[routes.eu]\nprefix = "/eu"\ncredential = "main"\nsub_organization = "eu"',
            ["routes.eu.sub_organization", "not an organization id"],
        ),
        (GOOD + '[server]\nlisten = "8787"', ["server.listen", "host:port"]),
        (GOOD + '[server]\nlistne = "127.0.0.1:1"', ["server.listne", "unknown setting"]),
        (GOOD + '[appcircle]\napi_url = "api.appcircle.io"', ["appcircle.api_url", "http(s) URL"]),
        (
            GOOD + GOOD.replace("main", "other"),
            ["several credentials but no [routes.NAME]"],
        ),
    ],
    ids=[
        "malformed-toml",
        "unknown-kind",
        "route-names-missing-credential",
        "duplicate-prefix",
        "unset-secret-variable",
        "unreadable-secret-file",
        "no-credential",
        "relative-prefix",
        "api-key-without-name",
        "two-secret-sources",
        "sub-organization-not-a-guid",
        "bad-listen",
        "typo-in-setting",
        "api-url-without-scheme",
        "ambiguous-credentials",
    ],
)
def test_bad_configuration_exits_2_with_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: list[str]
) -> None:
    """Each configuration mistake (bad TOML, unknown kind or setting, missing credential,
    duplicate prefix, bad secret source, bad listen or URL) makes `check` exit 2 with one message
    naming it, never printing an inline secret."""
    message = config_error(tmp_path, text, capsys)
    assert message.startswith("appcircle-proxy: ")
    for part in expected:
        assert part in message


def test_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A --config path that does not exist makes `check` exit 2 naming the file."""
    assert main(["check", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml' does not exist" in capsys.readouterr().err


def test_no_file_and_no_key_variables_names_the_variables(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With no config file and no key variables, `check` exits 2 naming
    APPCIRCLE_PERSONAL_ACCESS_KEY as a way to start."""
    message = config_error(tmp_path, None, capsys)
    assert "APPCIRCLE_PERSONAL_ACCESS_KEY" in message


def test_config_path_comes_from_the_environment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APPCIRCLE_PROXY_CONFIG names the config file when no --config is given."""
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD + '[server]\nlisten = "127.0.0.1:9001"')
    monkeypatch.setenv("APPCIRCLE_PROXY_CONFIG", str(path))
    assert load_settings().server.endpoint == Endpoint("127.0.0.1", 9001)


def test_environment_beats_file_and_flags_beat_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APPCIRCLE_PROXY_ variables override the file (api_url's trailing slash dropped), flags
    override the environment, and settings set nowhere else keep the file's value."""
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD + '[server]\nlisten = "127.0.0.1:9001"\n[appcircle]\nread_timeout = 5')
    assert load_settings(path).server.endpoint == Endpoint("127.0.0.1", 9001)
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__LISTEN", "0.0.0.0:9002")
    monkeypatch.setenv("APPCIRCLE_PROXY_APPCIRCLE__API_URL", "https://api.example.com/")
    settings = load_settings(path)
    assert settings.server.endpoint == Endpoint("0.0.0.0", 9002)
    assert settings.appcircle.api_url == "https://api.example.com"
    assert settings.appcircle.read_timeout == 5
    flagged = load_settings(path, {"server": {"listen": "[::1]:9003"}})
    assert flagged.server.endpoint == Endpoint("::1", 9003)
    assert flagged.server.listen == "[::1]:9003"


def test_a_default_listen_variable_is_a_default_every_other_source_beats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image's default listen (APPCIRCLE_PROXY_DEFAULT_LISTEN) is a built-in default:
    used when nothing sets listen, beaten by the file, the environment and flags."""
    monkeypatch.setenv("APPCIRCLE_PROXY_DEFAULT_LISTEN", "0.0.0.0:8787")
    plain = tmp_path / "plain.toml"
    plain.write_text(GOOD + '[server]\nallowed_hosts = ["proxy"]')
    assert load_settings(plain).server.endpoint == Endpoint("0.0.0.0", 8787)
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD + '[server]\nlisten = "127.0.0.1:9001"')
    assert load_settings(path).server.endpoint == Endpoint("127.0.0.1", 9001)
    monkeypatch.setenv("APPCIRCLE_PROXY_SERVER__LISTEN", "0.0.0.0:9002")
    assert load_settings(path).server.endpoint == Endpoint("0.0.0.0", 9002)
    flagged = load_settings(path, {"server": {"listen": "[::1]:9003"}})
    assert flagged.server.endpoint == Endpoint("::1", 9003)
    monkeypatch.delenv("APPCIRCLE_PROXY_SERVER__LISTEN")
    monkeypatch.setenv("APPCIRCLE_PROXY_DEFAULT_LISTEN", "nowhere")
    with pytest.raises(ConfigError, match="APPCIRCLE_PROXY_DEFAULT_LISTEN: 'nowhere' is not"):
        load_settings(plain)


def test_credentials_and_routes_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routes can be added through APPCIRCLE_PROXY_ROUTES__NAME__FIELD variables beside the
    file's credentials."""
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("APPCIRCLE_PROXY_ROUTES__EU__PREFIX", "/eu")
    monkeypatch.setenv("APPCIRCLE_PROXY_ROUTES__EU__CREDENTIAL", "main")
    monkeypatch.setenv("APPCIRCLE_PROXY_ROUTES__EU__SUB_ORGANIZATION", SUB_ORG)
    settings = load_settings(path)
    assert settings.routes["eu"].sub_organization == SUB_ORG
    assert settings.credentials["main"].secret_env == "TEST_APPCIRCLE_KEY"


@pytest.mark.parametrize(
    ("variables", "kind"),
    [
        ({"APPCIRCLE_PERSONAL_ACCESS_KEY": "k"}, "personal-access-key"),
        ({"APPCIRCLE_PERSONAL_API_TOKEN": "k"}, "personal-api-token"),
        ({"APPCIRCLE_API_KEY_NAME": "bot", "APPCIRCLE_API_KEY_SECRET": "s"}, "api-key"),
    ],
)
def test_zero_config_makes_one_root_route_from_appcircle_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], kind: str
) -> None:
    """Each zero-config key (personal access key, personal API token, API key name and secret)
    with APPCIRCLE_SUB_ORGANIZATION makes one credential and one root route on 127.0.0.1:8787."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("APPCIRCLE_SUB_ORGANIZATION", SUB_ORG)
    settings = load_settings()
    (credential,) = settings.credentials.values()
    (route,) = settings.routes.values()
    assert credential.kind == kind
    assert (route.prefix, route.sub_organization) == ("/", SUB_ORG)
    assert settings.server.endpoint == Endpoint("127.0.0.1", 8787)


def test_zero_config_api_key_without_its_secret_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """APPCIRCLE_API_KEY_NAME without its secret makes `check` exit 2 naming
    APPCIRCLE_API_KEY_SECRET."""
    monkeypatch.setenv("APPCIRCLE_API_KEY_NAME", "bot")
    assert "APPCIRCLE_API_KEY_SECRET" in config_error(tmp_path, None, capsys)


def test_settings_repr_masks_inline_secrets(tmp_path: Path) -> None:
    """An inline secret appears neither in the settings' repr nor in their model_dump()."""
    path = tmp_path / "proxy.toml"
    path.write_text(f'[credentials.main]\nkind = "personal-access-key"\nsecret = "{INLINE_SECRET}"')
    settings = load_settings(path)
    assert INLINE_SECRET not in repr(settings)
    assert INLINE_SECRET not in str(settings.model_dump())


def test_config_example_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.example.toml loads as shipped (with its secret file and key variable provided),
    with routes /, /eu and /ci and an api-key credential."""
    example = (Path(__file__).parent.parent / "config.example.toml").read_text()
    secret_file = tmp_path / "appcircle-api-key"
    secret_file.write_text("aks_example")
    path = tmp_path / "proxy.toml"
    path.write_text(example.replace("/run/secrets/appcircle-api-key", str(secret_file)))
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "pak_example")
    settings = load_settings(path)
    assert {route.prefix for route in settings.routes.values()} == {"/", "/eu", "/ci", "/mcp"}
    assert settings.credentials["ci"].kind == "api-key"
    assert settings.routes["agents"].upstream == "mcp"


def test_zero_config_reads_a_secret_file_named_by_a_file_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """APPCIRCLE_PERSONAL_ACCESS_KEY_FILE (a Docker secret, say) makes a personal-access-key
    credential reading that file."""
    key_file = tmp_path / "appcircle_personal_access_key"
    key_file.write_text("pak_from_a_docker_secret")
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY_FILE", str(key_file))
    (credential,) = load_settings().credentials.values()
    assert (credential.kind, credential.secret_file) == ("personal-access-key", key_file)


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("APPCIRCLE_PROXY_SERVER_LISTEN", "APPCIRCLE_PROXY_SERVER__LISTEN"),
        ("APPCIRCLE_PROXY_LISTEN", "APPCIRCLE_PROXY_SERVER__LISTEN"),
        ("APPCIRCLE_PROXY_API_URL", "APPCIRCLE_PROXY_APPCIRCLE__API_URL"),
        ("APPCIRCLE_PROXY_LOG__FROMAT", "APPCIRCLE_PROXY_LOG__FORMAT"),
        (
            "APPCIRCLE_PROXY_ROUTES__EU__SUBORGANIZATION",
            "APPCIRCLE_PROXY_ROUTES__EU__SUB_ORGANIZATION",
        ),
    ],
)
@pytest.mark.parametrize(
    "command", [["check", "--offline"], ["health", "--url", "http://127.0.0.1:1"], ["config"]]
)
def test_a_misspelled_settings_variable_stops_every_command_naming_the_valid_one(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    meant: str,
    command: list[str],
) -> None:
    """An APPCIRCLE_PROXY_* variable that names no setting would be silently ignored (the
    proxy listening where the user did not ask): every command stops with exit 2 and the
    nearest valid name, as an unknown key in the file is refused."""
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "a-key")
    monkeypatch.setenv(variable, "127.0.0.1:9999")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"`{variable}`: no such setting; did you mean `{meant}`?" in err
    assert "Traceback" not in err


def test_variables_the_commands_read_and_those_named_in_the_escape_hatch_are_let_through(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not every APPCIRCLE_PROXY_* variable is a setting: the config file's, what `run`
    gives CMD, the client token's; and APPCIRCLE_PROXY_IGNORE lets another tool's through."""
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCESS_KEY", "a-key")
    for name in ("APPCIRCLE_PROXY_URL", "APPCIRCLE_PROXY_CLIENT_TOKEN", "APPCIRCLE_PROXY_TOKEN"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("appcircle_proxy_server__listen", "127.0.0.1:9998")  # any case
    monkeypatch.setenv("APPCIRCLE_PROXY_CREDENTIALS__DEFAULT__KIND", "personal-access-key")
    monkeypatch.setenv("APPCIRCLE_PROXY_OTHER_TOOL", "x")
    monkeypatch.setenv("APPCIRCLE_PROXY_IGNORE", "APPCIRCLE_PROXY_OTHER_TOOL")
    assert main(["check", "--offline"]) == 0, capsys.readouterr().err
    monkeypatch.delenv("APPCIRCLE_PROXY_IGNORE")
    assert main(["check", "--offline"]) == 2
    assert "`APPCIRCLE_PROXY_OTHER_TOOL`: no such setting" in capsys.readouterr().err


def test_no_credential_names_a_variable_close_to_a_key_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key in a misspelled variable gets more than the generic "no credential": the
    variable is named, with the one it was meant to be."""
    monkeypatch.setenv("APPCIRCLE_PERSONAL_ACCES_KEY", "a-key")
    assert main(["check", "--offline"]) == 2
    err = capsys.readouterr().err
    assert "no credential is configured" in err
    assert "APPCIRCLE_PERSONAL_ACCES_KEY is set: did you mean APPCIRCLE_PERSONAL_ACCESS_KEY?" in err
    assert "a-key" not in err


def test_a_variable_the_configuration_reads_a_secret_from_is_not_a_misspelling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """secret_env may name a variable of the settings' prefix: it is read, so not unknown;
    a misspelled one beside it is still named (first, before the problem it causes)."""
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[credentials.main]\nkind = "personal-access-key"\nsecret_env = "APPCIRCLE_PROXY_MY_KEY"\n'
    )
    monkeypatch.setenv("APPCIRCLE_PROXY_MY_KEY", "a-key")
    assert main(["check", "--offline", "--config", str(config)]) == 0, capsys.readouterr().err
    monkeypatch.setenv("APPCIRCLE_PROXY_TOKENS__REFRESH_MARGN", "10")
    assert main(["check", "--offline", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "did you mean `APPCIRCLE_PROXY_TOKENS__REFRESH_MARGIN`?" in err
    assert "APPCIRCLE_PROXY_MY_KEY" not in err
