"""`deployer secrets`: the workers' secrets, kept on the hosts."""

from __future__ import annotations

import json
import sys

import click

from deployer.cli.base import (
    cli,
    hosts_option,
    open_fleet,
)
from deployer.errors import BadInput


@cli.group()
def secrets() -> None:
    """Secrets for the workers: kept on each host (shared/, mode 0600), never in git,
    never on a command line, never printed."""


@secrets.command("set")
@click.argument("key")
@hosts_option
@click.option("--reload", "reload_", is_flag=True, help="Reload the masters to use it now.")
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Set an empty value (refused otherwise: a typo, or an unset variable piped in).",
)
@click.pass_context
def secrets_set(
    ctx: click.Context, key: str, patterns: str | None, reload_: bool, allow_empty: bool
) -> None:
    """Set KEY to a value read from stdin (or a hidden prompt on a terminal)."""
    from deployer import fleet

    check_env_name(key)
    check_settable(key)
    value = read_secret(key)
    if not value and not allow_empty:
        raise BadInput(
            f"secrets set {key}: the value is empty (nothing on stdin?); no host was changed "
            "(give --allow-empty to set an empty value)"
        )
    with open_fleet(ctx, patterns) as session:
        failures = fleet.secrets(session, "set", key, value, reload_)
    sys.exit(session.exit_code if failures else 0)


@secrets.command("unset")
@click.argument("key")
@hosts_option
@click.option("--reload", "reload_", is_flag=True, help="Reload the masters to drop it now.")
@click.pass_context
def secrets_unset(ctx: click.Context, key: str, patterns: str | None, reload_: bool) -> None:
    """Remove KEY from the hosts."""
    from deployer import fleet

    check_env_name(key)
    with open_fleet(ctx, patterns) as session:
        failures = fleet.secrets(session, "unset", key, None, reload_)
    sys.exit(session.exit_code if failures else 0)


@secrets.command("list")
@hosts_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def secrets_list(ctx: click.Context, patterns: str | None, as_json: bool) -> None:
    """Which secrets each host has (names only)."""
    from deployer import fleet
    from deployer.report import Reporter

    with open_fleet(ctx, patterns, reporter=Reporter(sys.stderr)) as session:
        keys, failures = fleet.secret_names(session)
    if as_json:
        click.echo(json.dumps({"hosts": keys, "failed": failures}, indent=2))
    else:
        names = sorted({k for ks in keys.values() for k in ks})
        for name in names:
            have = [h for h, ks in keys.items() if name in ks]
            where = "all hosts" if len(have) == len(keys) else ", ".join(have)
            click.echo(f"{name}: {where}")
        if not names:
            click.echo("no secrets")
    if failures:
        sys.exit(1)


def check_env_name(key: str) -> None:
    from deployer.hostapi import workerenv

    if not workerenv.is_name(key):
        raise BadInput(f"KEY {key!r}: expected an environment variable name (letters, digits, _)")


def check_settable(key: str) -> None:
    """A name the master or deployer sets is no secret's: refused before any host."""
    from deployer.hostapi import workerenv

    why = workerenv.reserved(key)
    if why:
        raise BadInput(f"KEY {key}: {why}; a secret may not set it, pick another name")


def read_secret(key: str) -> str:
    """The value from a hidden prompt on a terminal, else stdin (one final newline off)."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"{key}: ")
    value = sys.stdin.read()
    return value[:-1] if value.endswith("\n") else value
