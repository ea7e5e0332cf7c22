"""The `deployer` group and what its commands share: the global and common options,
the host selection, the fleet session, tables, checked option values."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from deployer import __version__
from deployer.errors import BadInput

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
destination_option = click.option(
    "--destination",
    "-d",
    "destination",
    metavar="NAME",
    help="Stage: merge <inventory stem>.NAME.toml (inventory.NAME.toml) over the inventory; "
    "its own lock, history and logs.",
)
_hosts_flag = click.option(
    "--hosts",
    "-H",
    "patterns",
    metavar="GLOB",
    help="Comma-separated host names or globs; '!pattern' excludes (default: all).",
)


def _keep_roles(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta["deployer.roles"] = value


_roles_flag = click.option(
    "--roles",
    "-R",
    metavar="ROLE",
    expose_value=False,  # read by selected(): every command that takes --hosts takes it
    callback=_keep_roles,
    help="Comma-separated roles (globs too): the hosts that have one, and only those "
    "roles' masters (default: every role).",
)


def hosts_option(f: Any) -> Any:
    """--hosts and --roles: which hosts, and which of their roles' masters."""
    return _hosts_flag(_roles_flag(f))


def selected(ctx: click.Context, inv: Any, patterns: str | None) -> list[Any]:
    """The hosts --hosts and --roles select, each with just the roles selected."""
    return inv.select(patterns, ctx.meta.get("deployer.roles"))


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
verbose_option = click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Say each worker's reload progress (spawned, ready, draining, stopped), not one "
    "line per host and role; a failed reload says it anyway.",
)


def timeout_option(text: str) -> Any:
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0.5, max=300),
        default=5.0,
        show_default=True,
        metavar="SECONDS",
        help=text,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deployer")
@inventory_option
@destination_option
@click.pass_context
def cli(ctx: click.Context, inventory_path: str, destination: str | None) -> None:
    """Ship a long-running network service to a fleet of hosts with zero failed requests."""
    ctx.obj = {"inventory_path": inventory_path, "destination": destination or None}


def load_inventory(ctx: click.Context):  # -> Inventory (import kept lazy)
    from deployer import inventory

    return inventory.load(ctx.obj["inventory_path"], ctx.obj.get("destination"))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A plain text table: the header row, then the rows, columns padded to fit."""
    cells = [header, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return lines


def open_fleet(
    ctx: click.Context, patterns: str | None, lock_wait: float = 0.0, reporter: Any = None
):
    """A FleetSession of the selected hosts, to use in a `with` block."""
    from deployer.history import state_dir
    from deployer.session import FleetSession

    inv = load_inventory(ctx)
    hosts = selected(ctx, inv, patterns)
    state = state_dir(inv.path, inv.destination)
    return FleetSession(inv, hosts, state, reporter, lock_wait=lock_wait)


def _batch_item(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:  # "25%", or digits int() refuses (5000 of them, '²'): the checker says
        return text.strip()


def parse_batch(value: str | None) -> tuple[int | str, ...] | None:
    from deployer.inventory.checks import Invalid, batch

    if value is None:
        return None
    try:
        return batch([_batch_item(v) for v in value.split(",")])
    except Invalid as e:
        raise BadInput(f"--batch: {e}") from None


def checked(make: Callable[[], Callable[[Any], Any]]) -> Callable[..., Any]:
    """A click callback running an inventory checker (built on first use, so --help
    imports nothing): the same bounds as the inventory key, and no nan (click's
    FloatRange lets it through: every comparison with nan is false)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from deployer.hostapi.checks import Invalid

        if value is None:
            return None
        try:
            return make()(value)
        except Invalid as e:
            raise click.BadParameter(str(e)) from None

    return callback


def lock_wait_check() -> Callable[[Any], float]:
    from deployer.hostapi.checks import seconds

    return seconds(0.0, inclusive=True)


def canary_check() -> Callable[[Any], int]:
    from deployer.inventory.checks import MAX_HOSTS, integer

    return integer(0, MAX_HOSTS)


def check_release(to: str | None) -> str | None:
    """--to: a release name as the hosts' layout makes them; '' is not "previous"."""
    from deployer.errors import BadInput
    from deployer.hostapi.layout import RELEASE_NAME

    if to is not None and not RELEASE_NAME.fullmatch(to):
        raise BadInput(
            f"--to: expected a release name like 20250102030405-abc1234 (see `deployer "
            f"status`), got {to!r}; leave --to out to go back to the previous release"
        )
    return to


def fleet_report(
    ctx: click.Context,
    patterns: str | None,
    as_json: bool,
    collect: Callable[[Any], list[dict[str, Any]]],
    text: Callable[[dict[str, Any]], Iterable[str]],
    ok: Callable[[dict[str, Any]], bool],
) -> None:
    """A read-only report on the selected hosts (status, doctor, config --diff): the
    rows `collect` makes of the fleet session, printed as one JSON document or as the
    `text` lines of each row; exit 1 unless every row is `ok`."""
    from deployer.report import Reporter, printable

    with open_fleet(ctx, patterns, reporter=Reporter(sys.stderr)) as session:
        rows = collect(session)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            for line in text(row):
                click.echo(printable(line))
    if not all(ok(row) for row in rows):
        sys.exit(1)
