"""Command line: parse arguments, load settings, hand over to the server or a one-shot tool."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, ci, logs
from .demo import demo
from .server import serve
from .settings import ConfigError, LogSettings, Settings, load_settings
from .tools import check, show_config, token

__all__ = ["main"]

EPILOG = """\
configuration: --config FILE or $APPCIRCLE_PROXY_CONFIG (TOML); every setting can be
overridden by APPCIRCLE_PROXY_<SECTION>__<KEY>, and flags beat both. With no file,
$APPCIRCLE_PERSONAL_ACCESS_KEY (or $APPCIRCLE_PERSONAL_API_TOKEN, or $APPCIRCLE_API_KEY_NAME
and $APPCIRCLE_API_KEY_SECRET) and an optional $APPCIRCLE_SUB_ORGANIZATION make one route '/'.
"""


def _parser() -> argparse.ArgumentParser:
    # The shared options default to SUPPRESS so that they may stand before or after the
    # command without the command's defaults overwriting what stood before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    common.add_argument("--listen", metavar="HOST:PORT", help="listen address (server.listen)")
    common.add_argument("--api-url", metavar="URL", help="Appcircle API (appcircle.api_url)")
    common.add_argument("--auth-url", metavar="URL", help="Appcircle auth (appcircle.auth_url)")
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (log.level; default: info)",
    )
    common.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="serve: N processes sharing the port, each with its own token cache (default 1)",
    )

    parser = argparse.ArgumentParser(
        prog="appcircle-proxy",
        description="A local authenticating proxy for the Appcircle API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="run the proxy (the default)")
    commands.add_parser(
        "check", parents=[common], help="validate the config and get a token for every route"
    )
    commands.add_parser(
        "config", parents=[common], help="print the effective configuration, secrets masked"
    )
    commands.add_parser(
        "demo",
        parents=[common],
        help="run against a local stand-in Appcircle: no account, no network",
    )
    token_command = commands.add_parser(
        "token", parents=[common], help="print one session token on stdout, for scripts"
    )
    token_command.add_argument("--route", metavar="NAME", help="the route whose token to print")
    ci.add_parsers(commands, common)  # issue 10: `run` and `wait`, for CI jobs
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, dict[str, str]] = {}
    for flag, section, key in (
        ("listen", "server", "listen"),
        ("api_url", "appcircle", "api_url"),
        ("auth_url", "appcircle", "auth_url"),
        ("log_level", "log", "level"),
    ):
        if hasattr(args, flag):
            overrides.setdefault(section, {})[key] = getattr(args, flag)
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    if args.command == "demo":
        logs.configure(LogSettings(level=getattr(args, "log_level", "warning")))
        return demo(getattr(args, "listen", "127.0.0.1:8787"))

    # Issue 10: `run` and `wait` (ci.py) load the configuration in their own way.
    if args.command in ci.COMMANDS:
        return ci.main(args, _overrides(args))

    def load() -> Settings:
        return load_settings(getattr(args, "config", None), _overrides(args))

    try:
        settings = load()
    except ConfigError as err:
        print(f"appcircle-proxy: {err}", file=sys.stderr)
        return 2
    logs.configure(settings.log)
    try:
        if args.command == "check":
            return check(settings)
        if args.command == "config":
            return show_config(settings)
        if args.command == "token":
            return token(settings, args.route)
        workers = getattr(args, "workers", 1)
        if workers < 1:
            print("appcircle-proxy: --workers must be 1 or more", file=sys.stderr)
            return 2
        return serve(settings, load, workers)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
