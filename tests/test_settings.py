"""Configuration: each mistake stops the command with exit 2 and one clear, secret-free
message; the environment beats the file and flags beat the environment; zero-config."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli.main import main
from proxy.config.addresses import Endpoint
from proxy.config.errors import ConfigError
from proxy.config.load import load_settings

from .conftest import SUB_ORG

INLINE_SECRET = "pak_inline_value_that_must_never_be_printed"

GOOD = """
[credentials.main]
kind = "personal-access-key"
secret_env = "TEST_APPCIRCLE_KEY"
"""


@pytest.fixture(autouse=True)
def no_outside_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "APPCIRCLE_PROXY_CONFIG",
        "APPCIRCLE_PERSONAL_ACCESS_KEY",
        "APPCIRCLE_PERSONAL_API_TOKEN",
        "APPCIRCLE_API_KEY_NAME",
        "APPCIRCLE_API_KEY_SECRET",
        "APPCIRCLE_SUB_ORGANIZATION",
    ):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)


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
