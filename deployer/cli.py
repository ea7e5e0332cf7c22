"""The `deployer` command: parse, call, print, exit code. Nothing else lives here.

Imports of anything heavy (fabric, paramiko, git, rich) happen inside the
commands that need them, so `deployer --help` starts fast.
"""

from __future__ import annotations

import json
import sys

import click

from deployer import __version__
from deployer.errors import EXIT_BAD_INPUT, DeployerError

inventory_option = click.option(
    "--inventory",
    "-i",
    "inventory_path",
    envvar="DEPLOYER_INVENTORY",
    default="inventory.toml",
    show_default=True,
    metavar="FILE",
    help="Inventory file (also $DEPLOYER_INVENTORY).",
)
hosts_option = click.option(
    "--hosts",
    "-H",
    "patterns",
    metavar="GLOB",
    help="Comma-separated host names or globs; '!pattern' excludes (default: all).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deployer")
@inventory_option
@click.pass_context
def cli(ctx: click.Context, inventory_path: str) -> None:
    """Ship a long-running network service to a fleet of hosts with zero failed requests."""
    ctx.obj = {"inventory_path": inventory_path}


def load_inventory(ctx: click.Context):  # -> Inventory (import kept lazy)
    from deployer import inventory

    return inventory.load(ctx.obj["inventory_path"])


@cli.command()
@hosts_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def hosts(ctx: click.Context, patterns: str | None, as_json: bool) -> None:
    """List the selected hosts with their address, port, user and transport."""
    rows = [h.describe() for h in load_inventory(ctx).select(patterns)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["name", "address", "port", "user", "transport"]
    cells = [columns] + [["-" if r[c] is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@cli.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def master(args: tuple[str, ...]) -> None:
    """The resident cluster master (run, start, reload, status, scale, stop, unit, upgrade)."""
    from deployer.master.cli import main as master_main

    sys.exit(master_main(list(args)))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors become a message and an exit code."""
    try:
        cli.main(args=argv, prog_name="deployer", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_BAD_INPUT)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except DeployerError as e:
        click.echo(f"deployer: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
