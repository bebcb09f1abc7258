"""The command line: argument parsing and each subcommand (serve, run, wait, health, check,
token, config, demo)."""
