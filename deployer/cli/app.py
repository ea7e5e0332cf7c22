"""`deployer app`: the app on the hosts (reload, stop, start, scale, remove) and its logs."""

from __future__ import annotations

import sys
from typing import Any

import click

from deployer.cli.base import (
    cli,
    hosts_option,
    open_fleet,
    verbose_option,
)
from deployer.errors import BadInput


@cli.group()
def app() -> None:
    """The app on the hosts: reload, stop, start, scale, remove; its logs."""


def _lifecycle(
    ctx: click.Context, patterns: str | None, action: str, *args: Any, verbose: bool = False
) -> None:
    from deployer import lifecycle

    with open_fleet(ctx, patterns) as session:
        session.verbose = verbose
        outcome = getattr(lifecycle, action)(session, *args)
    sys.exit(outcome.exit_code)


# `deployer app ACTION`: the lifecycle actions that take only the host selection
_LIFECYCLE = {
    "reload": (
        "reload",
        """Replace every worker (each old one drains once its replacement is
    ready), batch by batch with health checks (the rollout's path, without a new
    release): new env, secrets, a stuck worker.""",
    ),
    "restart": (
        "reload",
        """The same as `app reload`: every worker replaced, no request lost.""",
    ),
    "stop": (
        "stop",
        """Stop the masters (workers drained); they stay down, a reboot too,
    until `deployer app start` or the next rollout.""",
    ),
    "start": (
        "start",
        """Start the masters that do not run, on the current release; health
    checked.""",
    ),
}


def _lifecycle_command(name: str, action: str, doc: str) -> None:
    def command(ctx: click.Context, patterns: str | None, verbose: bool) -> None:
        _lifecycle(ctx, patterns, action, verbose=verbose)

    command.__doc__ = doc
    app.command(name)(hosts_option(verbose_option(click.pass_context(command))))


for _name, (_action, _doc) in _LIFECYCLE.items():
    _lifecycle_command(_name, _action, _doc)


@app.command("scale")
@click.argument("workers", type=click.IntRange(1, 10_000))
@hosts_option
@click.pass_context
def app_scale(ctx: click.Context, workers: int, patterns: str | None) -> None:
    """WORKERS per master (with roles: name one with --roles), kept in the hosts'
    master.toml (`config --diff` shows it against the inventory; setup resets it)."""
    _lifecycle(ctx, patterns, "scale", workers)


@app.command("remove")
@hosts_option
@click.option("--purge", is_flag=True, help="Also delete deploy_to: releases, shared, secrets.")
@click.option("--yes", is_flag=True, help="--purge without asking.")
@click.pass_context
def app_remove(ctx: click.Context, patterns: str | None, purge: bool, yes: bool) -> None:
    """Stop the masters, disable and delete their systemd units and master.toml;
    with --purge, delete deploy_to too."""
    if purge and not yes:
        if not sys.stdin.isatty():
            raise BadInput("remove --purge deletes deploy_to on every selected host: add --yes")
        click.confirm("Delete deploy_to (releases, shared files, secrets) on these hosts?",
                      abort=True)  # fmt: skip
    _lifecycle(ctx, patterns, "remove", purge)


@app.command("logs")
@hosts_option
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    help="The last N lines of each host (default 50; with --since: all since then).",
)
@click.option("--since", metavar="TIME", help="Lines from then on: 10m, 1h, 2d, or an ISO time.")
@click.option("-f", "--follow", is_flag=True, help="Then new lines as they come, until Ctrl-C.")
@click.option("--until-idle", type=float, hidden=True, help="Follow: stop after S quiet seconds.")
@click.pass_context
def app_logs(
    ctx: click.Context,
    patterns: str | None,
    lines: int | None,
    since: str | None,
    follow: bool,
    until_idle: float | None,
) -> None:
    """The masters' and workers' logs (log/master.log) of the selected hosts, merged
    by time, each line after its host's name. -f follows each log across a reopen
    (SIGUSR1 rotation), like `tail -F`."""
    from deployer import applogs
    from deployer.report import Reporter

    stamp = applogs.parse_since(since) if since else None
    if lines is None and stamp is None:
        lines = 50
    with open_fleet(ctx, patterns, reporter=Reporter(sys.stderr)) as session:
        code = applogs.logs(session, lines, stamp, follow, sys.stdout, sys.stderr, until_idle)
    sys.exit(code)
