"""`deployer master` and `deployer migrate`: the host side's own command lines, run here."""

from __future__ import annotations

import sys

import click

from deployer.cli.base import (
    cli,
    load_inventory,
    open_fleet,
)


@cli.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def master(args: tuple[str, ...]) -> None:
    """The resident cluster master (run, start, reload, status, scale, stop, unit, upgrade)."""
    # main() hands `deployer master ...` over before click parses it (see
    # verbatim_master_args); this body serves callers of `cli` itself.
    from deployer.master.cli import main as master_main

    sys.exit(master_main(list(args)))


@cli.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def migrate(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Live-stage migrations: status, up, down, accept run on the inventory's
    [migrations] host against its current release; new, lint, --local or an
    explicit --database run on this machine."""
    from pathlib import Path

    from deployer.hostapi.calls import MIGRATE_COMMANDS
    from deployer.migrating import on_host
    from deployer.migrations.cli import main as migrate_main

    argv = list(args)
    local = "--local" in argv or any(a.split("=")[0] == "--database" for a in argv)
    argv = [a for a in argv if a != "--local"]
    remote = argv and argv[0] in MIGRATE_COMMANDS and not local
    if argv[:1] == ["lint"] and not local and Path(ctx.obj["inventory_path"]).exists():
        argv = _lint_as_configured(ctx, argv)
    if remote and Path(ctx.obj["inventory_path"]).exists():
        with open_fleet(ctx, None) as session:
            if session.inventory.migrations is not None:
                code, stderr = on_host(session, argv, click.echo)
                sys.stderr.write(stderr)
                sys.exit(code)
    sys.exit(migrate_main(argv))


def _lint_as_configured(ctx: click.Context, argv: list[str]) -> list[str]:
    """`migrate lint` with the inventory's [migrations]: its dir, and the dialect of
    its database, every file checked without connecting (the database is often only
    reachable from the hosts)."""
    from deployer.migrating import dialect

    migrations = load_inventory(ctx).migrations
    if migrations is None or any(a.split("=")[0] == "--dialect" for a in argv):
        return argv
    extra = ["--dialect", dialect(migrations.database)]
    if not any(a.split("=")[0] == "--dir" for a in argv):
        extra += ["--dir", migrations.dir]
    click.echo(
        f"lint: every file in {migrations.dir}/ for {extra[1]} ([migrations] database;"
        " not connecting)",
        err=True,
    )
    return [*argv, *extra]


def verbatim_master_args(args: list[str]) -> list[str] | None:
    """The arguments after `master` (behind any -i/--inventory, -d/--destination), exactly
    as given: click would drop the `--` before the worker command (`master run ... -- CMD`)."""
    i = 0
    globals_ = ("-i", "--inventory", "-d", "--destination")
    while i < len(args) and (args[i] in globals_ or args[i].startswith(("--inv", "--dest"))):
        i += 1 if "=" in args[i] else 2
    return args[i + 1 :] if i < len(args) and args[i] == "master" else None
