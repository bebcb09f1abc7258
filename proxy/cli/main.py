"""Command line: parse arguments, load settings, hand over to the server or a one-shot tool.

Each command is one entry in COMMANDS: its one-line summary, its description, the flags that
apply to it and the function that runs it. Adding a command is adding an entry (and its
function); the parser, the help and the refusal of flags that do not apply follow from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..config.errors import ConfigError
from ..config.hardening import make_undumpable
from ..config.load import load_settings
from ..config.settings import ENV_PREFIX, Settings
from ..telemetry import logs

__all__ = ["main"]

EPILOG = """\
configuration: --config FILE or $APPCIRCLE_PROXY_CONFIG (TOML); every setting can be
overridden by APPCIRCLE_PROXY_<SECTION>__<KEY>, and flags beat both. With no file,
$APPCIRCLE_PERSONAL_ACCESS_KEY (or $APPCIRCLE_PERSONAL_API_TOKEN, or $APPCIRCLE_API_KEY_NAME
and $APPCIRCLE_API_KEY_SECRET) and an optional $APPCIRCLE_SUB_ORGANIZATION make one route '/'.
Each command has its own --help.
"""

Flags = Callable[[argparse.ArgumentParser], None]

# Where a client token may travel, as every help text says it.
TOKEN_HEADERS = "as Authorization: Bearer TOKEN or Proxy-Authorization: Bearer TOKEN"


# Flag groups. Defaults are SUPPRESS (set on the parsers) so that a flag may stand before or
# after the command without the command's defaults overwriting what stood before it.
def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    parser.add_argument("--api-url", metavar="URL", help="Appcircle API (appcircle.api_url)")
    parser.add_argument("--auth-url", metavar="URL", help="Appcircle auth (appcircle.auth_url)")


def _log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (log.level; default: info)",
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="log line format (log.format; default: text)"
    )


def _listen_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="listen address (server.listen), or unix:/path"
    )


def _listener_flags(parser: argparse.ArgumentParser) -> None:
    _listen_flag(parser)
    parser.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="a separate listener for /_proxy/ alone (server.admin_listen)",
    )


def _server_flags(parser: argparse.ArgumentParser) -> None:
    _listener_flags(parser)
    parser.add_argument(
        "--client-token-file",
        type=Path,
        metavar="FILE",
        help=f"clients must send this token ({TOKEN_HEADERS}) (server.client_token_file)",
    )


def _workers_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="N processes sharing the port, each with its own token cache (default 1)",
    )


def _route_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--route", metavar="NAME", help="the route whose token to print")


def _offline_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--offline",
        action="store_true",
        help="validate the configuration only: no secrets, no network (for a deployment's "
        "config on a laptop)",
    )


def _url_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        metavar="URL",
        help="the proxy, e.g. http://127.0.0.1:8787: then no configuration is read",
    )


def _timeout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="how long to wait for the answer (2)"
    )


# Where each flag lands in the settings: (section, key).
SETTING_FLAGS: dict[str, tuple[str, str]] = {
    "listen": ("server", "listen"),
    "admin_listen": ("server", "admin_listen"),
    "client_token_file": ("server", "client_token_file"),
    "api_url": ("appcircle", "api_url"),
    "auth_url": ("appcircle", "auth_url"),
    "log_level": ("log", "level"),
    "log_format": ("log", "format"),
}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in SETTING_FLAGS.items():
        if hasattr(args, flag):
            overrides.setdefault(section, {})[key] = getattr(args, flag)
    return overrides


def _load(args: argparse.Namespace, *, offline: bool = False, probe: bool = False) -> Settings:
    return load_settings(
        getattr(args, "config", None), _overrides(args), offline=offline, probe=probe
    )


def _serve(args: argparse.Namespace) -> int:
    from ..serve.server import serve

    workers = getattr(args, "workers", 1)
    if workers < 1:
        raise ConfigError("--workers must be 1 or more")
    settings = _load(args)
    logs.configure(settings.log)
    return serve(settings, lambda: _load(args), workers)


def _check(args: argparse.Namespace) -> int:
    from .tools import check, check_offline

    if getattr(args, "offline", False):
        return check_offline(_load(args, offline=True))
    settings = _load(args)
    logs.configure(settings.log)
    return check(settings)


def _config(args: argparse.Namespace) -> int:
    from .tools import show_config

    return show_config(_load(args))


def _token(args: argparse.Namespace) -> int:
    from .tools import token

    settings = _load(args)
    logs.configure(settings.log)
    return token(settings, getattr(args, "route", None))


def _health(args: argparse.Namespace) -> int:
    from ..config.variables import refuse_unknown_setting_variables
    from .probe import health, health_at

    timeout = getattr(args, "timeout", 2.0)
    if (url := getattr(args, "url", None)) is not None:
        # No configuration is read; a misspelled settings variable is refused all the same.
        refuse_unknown_setting_variables()
        return health_at(url, timeout)
    # The addresses, not the secrets (a rotated key file must not make a running proxy look
    # dead), and no credential (the key may be on the proxy's own command line alone).
    return health(_load(args, probe=True), timeout)


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo

    return demo(getattr(args, "listen", "127.0.0.1:8787"), _overrides(args).get("log", {}))


# The CI commands `run -- CMD` and `wait` (ci.py).
def _run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--route", metavar="NAME", help="give CMD this route's URL (with its prefix)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long every route may take to get a session token (60)",
    )
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- and the command to run")


def _wait_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        metavar="URL",
        help="the proxy, e.g. http://appcircle-proxy:8787 (default: from the configuration); "
        f"$APPCIRCLE_PROXY_CLIENT_TOKEN, when set, is sent as its client token ({TOKEN_HEADERS})",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="how long to wait for it (60)"
    )


def _run(args: argparse.Namespace) -> int:
    from .ci import run

    return run(args, _overrides(args))


def _wait(args: argparse.Namespace) -> int:
    from .ci import wait

    return wait(args, _overrides(args))


@dataclass(frozen=True, slots=True)
class Command:
    summary: str
    description: str
    flags: tuple[Flags, ...]
    run: Callable[[argparse.Namespace], int]
    # Reads a key or the client token: made non-dumpable before it reads any.
    secrets: bool = True


COMMANDS: dict[str, Command] = {
    "serve": Command(
        "run the proxy (the default)",
        "Listen for plain requests and forward them to the Appcircle API with a cached, "
        "renewed session token. Runs until SIGINT or SIGTERM (draining in-flight requests); "
        "SIGHUP reloads credentials.",
        (_config_flags, _server_flags, _workers_flag, _log_flags),
        _serve,
    ),
    "check": Command(
        "validate the config and get a token for every route",
        "Validate the configuration and obtain a session token for every route, printing "
        "each route's organization and token expiry; exit 1 if any route fails. With "
        "--offline, validate the configuration alone, without secrets or network.",
        (_config_flags, _offline_flag, _log_flags),
        _check,
    ),
    "config": Command(
        "print the effective configuration, secrets masked",
        "Print the configuration the proxy would run with (file, environment and flags "
        "merged) as JSON, every secret masked.",
        (_config_flags, _server_flags, _log_flags),
        _config,
    ),
    "token": Command(
        "print one session token on stdout, for scripts",
        "Obtain one session token and print it on stdout, for a tool that cannot use the "
        "proxy. With several routes, choose one with --route.",
        (_config_flags, _route_flag, _log_flags),
        _token,
    ),
    "health": Command(
        "exit 0 when the running proxy answers its health check",
        "Ask the proxy at --url, or the one this configuration describes (on "
        "server.admin_listen when set, else on server.listen), for /_proxy/health; exit 0 "
        "when it answers, 1 when not. For container health checks: with --url it reads no "
        "configuration; without, the same file and environment as the proxy. It needs no "
        "key: /_proxy/health answers anyone.",
        (_config_flags, _listener_flags, _url_flag, _timeout_flag),
        _health,
        secrets=False,
    ),
    "demo": Command(
        "run against a local stand-in Appcircle: no account, no network",
        "Start a local stand-in for Appcircle's auth and API hosts, with made-up keys, and "
        "the proxy in front of it, with one route per kind of key. Reads no configuration "
        "file and no environment variable: your real keys are never used.",
        (_listen_flag, _log_flags),
        _demo,
        secrets=False,
    ),
    # CI (ci.py).
    "run": Command(
        "CI: run CMD with the proxy in front of Appcircle and the key out of its reach",
        "Start the proxy on a free loopback port (or --listen), wait until every route has a "
        "session token, then run CMD with APPCIRCLE_PROXY_URL and APPCIRCLE_API_URL pointing "
        "at it and without the variables the key came from (with a client token, CMD gets it "
        "as APPCIRCLE_PROXY_CLIENT_TOKEN, to send as Authorization: Bearer or "
        "Proxy-Authorization: Bearer). Signals are passed on to CMD; "
        "when it exits, the proxy drains and stops, and run exits with CMD's status. "
        "Usage: appcircle-proxy run [--route NAME] -- CMD [ARGS ...]",
        (_config_flags, _listen_flag, _run_flags, _log_flags),
        _run,
    ),
    "wait": Command(
        "CI: exit 0 once a proxy is ready, 1 with the reason after --timeout",
        "Poll /_proxy/ready of the proxy at --url, or of the one this configuration "
        "describes (admin_listen when set, else listen), until it answers 200 (exit 0) or "
        "--timeout passes (exit 1, with the last reason). With --url, no configuration is "
        "read, and $APPCIRCLE_PROXY_CLIENT_TOKEN is sent as the client token when it is set; "
        "a client token may travel " + TOKEN_HEADERS.removeprefix("as ") + ".",
        (_config_flags, _listener_flags, _wait_flags),
        _wait,
    ),
}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="appcircle-proxy",
        description="A local authenticating proxy for the Appcircle API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    # With no command, serve: so serve's flags stand before any command as well.
    for add in COMMANDS["serve"].flags:
        add(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, command in COMMANDS.items():
        subparser = commands.add_parser(
            name,
            help=command.summary,
            description=command.description,
            argument_default=argparse.SUPPRESS,
        )
        for add in command.flags:
            add(subparser)
        subparsers[name] = subparser
    return parser, subparsers


def _refuse_flags_that_do_not_apply(
    args: argparse.Namespace, parser: argparse.ArgumentParser, name: str
) -> None:
    """A flag given before the command lands in the namespace even when the command has no
    use for it; say so rather than ignore it."""
    accepted = {action.dest for action in parser._actions}
    for dest in vars(args):
        if dest != "command" and dest not in accepted:
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag} does not apply to '{name}'; see appcircle-proxy {name} --help")


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = _parser()
    args = parser.parse_args(argv)
    name = getattr(args, "command", None) or "serve"
    _refuse_flags_that_do_not_apply(args, subparsers[name], name)
    command = COMMANDS[name]
    if command.secrets and (problem := make_undumpable()) is not None:
        # Not fatal: the key stays out of logs and of `run`'s command either way.
        print(
            f"appcircle-proxy: WARNING: cannot make this process non-dumpable ({problem}): "
            "other processes of this user may read the key from its memory",
            file=sys.stderr,
        )
    try:
        return command.run(args)
    except ConfigError as err:
        # The file may be what is broken: the format can still come from a flag or variable.
        wanted = getattr(args, "log_format", None) or os.environ.get(f"{ENV_PREFIX}LOG__FORMAT", "")
        logs.refusal(str(err), json_lines=wanted.lower() == "json")
        return 2
    except ImportError as err:
        # Raised by aiohttp_private, too, for an aiohttp not of the shape it was checked on.
        logs.refusal(f"cannot start: {err}", json_lines=False)
        return 2
    except KeyboardInterrupt:
        return 130
