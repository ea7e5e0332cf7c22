"""`deployer exec`, `config` and `doctor`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from deployer.cli.base import (
    cli,
    fleet_report,
    hosts_option,
    json_option,
    load_inventory,
    open_fleet,
    selected,
    timeout_option,
)
from deployer.errors import BadInput


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@hosts_option
@click.option(
    "--parallel", type=click.IntRange(1, 256), help="Hosts at a time (default: [rollout] parallel)."
)
@click.option(
    "-i", "--interactive", is_flag=True, help="A console on one host, on a TTY (like ssh -t)."
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(
    ctx: click.Context,
    patterns: str | None,
    parallel: int | None,
    interactive: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in <deploy_to>/current on each host with the app's environment
    ([env] and the secrets, read on the host); each output line after `HOST: `.
    Exit 0 only if it exited 0 on every host. Put `--` before a COMMAND with options."""
    from deployer import execute
    from deployer.report import Reporter

    with open_fleet(ctx, patterns, reporter=Reporter(sys.stderr)) as session:
        if interactive:
            if len(session.names) != 1:
                raise BadInput(
                    f"--interactive: needs exactly one host, {len(session.names)} selected "
                    f"({', '.join(session.names)}): choose one with --hosts"
                )
            code = execute.run_interactive(session, command)
        else:
            code = execute.run_exec(session, command, parallel, sys.stdout, sys.stderr)
    sys.exit(code)


@cli.command()
@hosts_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--diff", is_flag=True, help="What differs on each host (exit 1 if anything does).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1, max=600),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="--diff: a host that has not answered by then counts as differing.",
)
@click.pass_context
def config(
    ctx: click.Context, patterns: str | None, as_json: bool, diff: bool, timeout: float
) -> None:
    """The configuration each selected host gets: [app], [master] as its master.toml
    has it, [health], [env] (passwords in URLs masked). --diff: each host's master.toml
    and agent against what `deployer setup` would write now."""
    from deployer import drift
    from deployer.report import printable

    if not diff:
        inv = load_inventory(ctx)
        confs = [drift.resolved(h, inv) for h in selected(ctx, inv, patterns)]
        if as_json:
            click.echo(json.dumps(confs, indent=2))
            return
        for i, conf in enumerate(confs):
            click.echo(("\n" if i else "") + "\n".join(printable(x) for x in drift.render(conf)))
        return

    def text(r: dict[str, Any]) -> list[str]:
        verdict = "DIFFERS" if r["differs"] else "same as the inventory"
        error = f": {r['error']}" if r["error"] else ""
        notes = [f"  - {line}" for line in [*r["notes"], *r["changes"]]]
        return [f"{r['host']}: {verdict}{error}", *notes, *(r.get("diff") or [])]

    fleet_report(
        ctx, patterns, as_json, lambda s: drift.drift(s, timeout), text, lambda r: not r["differs"]
    )


@cli.command()
@hosts_option
@json_option
@timeout_option("Connection attempts to a host within this time.")
@click.pass_context
def doctor(ctx: click.Context, patterns: str | None, as_json: bool, timeout: float) -> None:
    """Read-only preflight of each host, one line per check: SSH and host key, Python,
    disk space, the layout, systemd, the listen port, the clock. Works before `deployer
    setup`; exit 1 if any check fails."""
    from deployer import doctor

    def text(r: dict[str, Any]) -> list[str]:
        return [f"{r['host']}: {c['check']:<8} {c['status']:<4} {c['detail']}" for c in r["checks"]]

    fleet_report(
        ctx, patterns, as_json, lambda s: doctor.doctor(s, timeout), text, lambda r: r["ok"]
    )
