"""Deploying: hosts, setup, rollout, rollback, status, history, logs, init, demo, the git
hooks' entry, unlock, disconnect."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from deployer.cli.base import (
    canary_check,
    check_release,
    checked,
    cli,
    fleet_report,
    hosts_option,
    json_option,
    load_inventory,
    lock_wait_check,
    open_fleet,
    parse_batch,
    selected,
    table,
    timeout_option,
    verbose_option,
)
from deployer.errors import BadInput, DeployerError


@cli.command()
@hosts_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def hosts(ctx: click.Context, patterns: str | None, as_json: bool) -> None:
    """List the selected hosts with their address, port, user and transport."""
    rows = [h.describe() for h in selected(ctx, load_inventory(ctx), patterns)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["name", "address", "port", "user", "transport"]
    columns += ["roles"] if any(r["roles"] for r in rows) else []
    cells = [
        ["-" if not r[c] else ",".join(r[c]) if c == "roles" else str(r[c]) for c in columns]
        for r in rows
    ]
    for line in table(columns, cells):
        click.echo(line)


@cli.command()
@hosts_option
@click.pass_context
def setup(ctx: click.Context, patterns: str | None) -> None:
    """Prepare hosts: layout, host agent, master config, master running. Idempotent."""
    from deployer import fleet

    with open_fleet(ctx, patterns) as session:
        failures = fleet.setup(session)
    if failures:
        sys.exit(session.exit_code)


@cli.command()
@click.argument("rev", required=False)
@hosts_option
@click.option("--batch", help='Hosts per batch: N, "N%", or a ramp like 1,10%,100%.')
@click.option(
    "--canary", type=int, callback=checked(canary_check), help="Hosts in the first batch."
)
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--repo", "repo_path", metavar="PATH", help="Repository to deploy from.")
@click.option(
    "--lock-wait", type=float, default=0.0, metavar="SECONDS", callback=checked(lock_wait_check)
)
@click.option("--deploy-id", hidden=True, help="Name of this rollout (set by the git hook).")
@click.option("--log-file", hidden=True, help="Where its output goes (recorded in history).")
@click.option(
    "--pre-deploy-done", is_flag=True, hidden=True, help="pre-receive ran the pre-deploy hook."
)
@verbose_option
@click.pass_context
def rollout(
    ctx: click.Context,
    rev: str | None,
    patterns: str | None,
    batch: str | None,
    canary: int | None,
    dry_run: bool,
    repo_path: str | None,
    lock_wait: float,
    deploy_id: str | None,
    log_file: str | None,
    pre_deploy_done: bool,
    verbose: bool,
) -> None:
    """Deploy REV (default: HEAD of the repo) to the selected hosts, batch by batch."""
    from deployer import runlog
    from deployer.githooks import LOG_ID
    from deployer.inventory import expand_path
    from deployer.plan import plan_rollout
    from deployer.report import TeeReporter
    from deployer.rollout import run_rollout
    from deployer.sync import Source

    if deploy_id is not None and not LOG_ID.fullmatch(deploy_id):
        raise BadInput(
            f"--deploy-id {deploy_id!r}: expected an id like 20260101120000-abc1234-0042"
        )
    with open_fleet(ctx, patterns, lock_wait) as session:
        if not dry_run:
            session.open_all()  # the handshakes go on while the revision is resolved
        session.verbose = verbose
        inv = session.inventory
        repo = repo_path or (str(expand_path(inv.app.repo, inv.path)) if inv.app.repo else ".")
        source = Source(repo)
        revision = source.resolve(rev)
        plan = plan_rollout(inv, session.names, revision.sha, parse_batch(batch), canary)
        if dry_run:
            click.echo(plan.render())
            return
        if log_file is None:  # from a terminal: its log too, for `deployer logs`
            deploy_id = runlog.new_id(revision.sha)
            path, log = runlog.create(session.state_dir, deploy_id)
            log_file = str(path)
            session.reporter = TeeReporter(session.reporter, log)
            session.reporter.say(f"rollout {deploy_id}: log {log_file}")
        try:
            outcome = run_rollout(
                session, plan, source, revision, deploy_id, log_file, pre_deploy_done
            )
        except DeployerError as e:
            session.reporter.say(runlog.verdict_line(e.exit_code, str(e).split("\n")[0]))
            raise
        why = "" if outcome.ok else f"at {outcome.step}" if outcome.step else ""
        session.reporter.say(runlog.verdict_line(outcome.exit_code, why))
    sys.exit(outcome.exit_code)


@cli.command()
@click.option("--to", "to", metavar="RELEASE", help="Release to go to (default: previous).")
@hosts_option
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--migrations", is_flag=True, help="Also run down the left releases' expand ones.")
@click.option("--force", is_flag=True, help="Go back past contract migrations anyway.")
@verbose_option
@click.pass_context
def rollback(
    ctx: click.Context,
    to: str | None,
    patterns: str | None,
    dry_run: bool,
    migrations: bool,
    force: bool,
    verbose: bool,
) -> None:
    """Switch hosts back to their previous release, batch by batch with health checks."""
    from deployer.rollout import run_rollback

    check_release(to)
    with open_fleet(ctx, patterns) as session:
        session.verbose = verbose
        plan, outcome = run_rollback(session, to, dry_run, force, migrations)
    if outcome is None:
        click.echo(plan.render())
        return
    sys.exit(outcome.exit_code)


@cli.command()
@hosts_option
@json_option
@timeout_option("A host that has not answered by then is reported unreachable.")
@click.pass_context
def status(ctx: click.Context, patterns: str | None, as_json: bool, timeout: float) -> None:
    """Per host: release, master workers, crashes, health, lock. Exit 0 only if every
    host is reachable, all its workers are ready on the current release, nothing
    crashed lately, health passes and no deploy lock is held."""
    from deployer import fleet

    def text(r: dict[str, Any]) -> list[str]:
        return [status_line(r), *(f"  - {problem}" for problem in r["problems"])]

    fleet_report(
        ctx, patterns, as_json, lambda s: fleet.status(s, timeout), text, lambda r: r["ok"]
    )


def status_line(r: dict) -> str:
    verdict = "ok" if r["ok"] else "NOT OK"
    if "current" not in r:
        return f"{r['host']}: {verdict}"
    rev = (r["revision"] or "-")[:12]
    roles = "; ".join(role_summary(role) for role in r["roles"])
    return f"{r['host']}: {verdict}: {r['current'] or 'no release'} ({rev}), {roles}"


def role_summary(role: dict) -> str:
    """`web: master pid 12 4/4 ready on RELEASE, health ok` (no name for the implicit
    role): each role's release, as `rollout --roles` may leave them different."""
    m = role["master"]
    master = (
        f"master pid {m['pid']} {m['ready']}/{m['configured']} ready on {m['release']}"
        if m
        else ("master running" if role["master_running"] else "no master")
    )
    health = f", health {role['health']}" if role["health"] else ""
    return f"{role['role'] + ': ' if role['role'] else ''}{master}{health}"


@cli.command()
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Past deploys, newest first."""
    from deployer.history import History, state_dir
    from deployer.report import printable

    inv = load_inventory(ctx)
    found = History(state_dir(inv.path, inv.destination)).read(limit)
    warning = found.warning()
    if warning:
        click.echo(f"deployer: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(found.records, indent=2))
        return
    rows = [[printable(cell) for cell in history_row(e)] for e in found.records]
    for line in table(HISTORY_COLUMNS, rows):
        click.echo(line)


HISTORY_COLUMNS = ["id", "action", "revision", "by", "started", "hosts", "result", "took"]


def history_row(e: dict) -> list[str]:
    """One history record's cells; what a record lacks shows as "-", not "None"."""
    when = str(e.get("started") or e.get("since") or "-")
    who = str(e.get("performer") or e.get("user") or "-")
    if e.get("action") == "unlock":
        broke = "; ".join(e.get("broke") or []) or "nothing"
        return [str(e["id"]), "unlock", "-", who, when, "-", f"broke {broke}", "-"]
    what = str(e.get("revision") or e.get("release") or "-")[:12]
    step = f" at {e['failed_step']}" if e.get("failed_step") else ""
    took = f"{e['duration_s']}s" if e.get("duration_s") is not None else "-"
    hosts = str(len(e["hosts"])) if e.get("hosts") else "-"
    result = f"{e.get('result') or '-'}{step}"
    return [str(e["id"]), str(e.get("action")), what, who, when, hosts, result, took]


@cli.command()
@click.argument("deploy_id", metavar="[ID]", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing while that rollout runs.")
@click.pass_context
def logs(ctx: click.Context, deploy_id: str | None, follow: bool) -> None:
    """The log of a rollout (by id or id prefix; default: the newest). With -f, follow
    it to its end and exit with the rollout's own exit code."""
    from deployer import githooks, runlog
    from deployer.history import state_dir

    inv = load_inventory(ctx)
    state = state_dir(inv.path, inv.destination)
    path = githooks.log_path(state, deploy_id)
    if not follow:
        githooks.copy_file(path, sys.stdout)
        return
    githooks.follow(path, lambda: runlog.going_on(path, state, inv.app.name), sys.stdout)
    code = runlog.read_verdict(path)
    if code is None:
        raise DeployerError(f"rollout {path.stem} ended without a verdict (killed?): {path}")
    sys.exit(code)


@cli.command()
@click.option("--repo", required=True, metavar="PATH", help="Bare repository to create or adopt.")
@click.option("--branch", default="main", show_default=True, help="The branch that deploys.")
@click.pass_context
def init(ctx: click.Context, repo: str, branch: str) -> None:
    """Create (or adopt) a bare deploy repository whose pushes to BRANCH deploy."""
    from pathlib import Path

    from deployer import githooks

    repo_path = Path(repo).expanduser().absolute()
    inventory = Path(ctx.obj["inventory_path"]).expanduser().absolute()
    changes = githooks.init(
        repo_path, inventory, branch, sys.executable, ctx.obj.get("destination")
    )
    for line in changes or [f"{repo_path}: already set up, nothing changed"]:
        click.echo(line)
    click.echo("In your app's repository, add the remote (this machine, or over ssh):")
    for line in githooks.remote_lines(repo_path):
        click.echo(f"  {line}")
    click.echo(f"then deploy with: git push deploy {branch}")


@cli.command()
@click.argument("directory", metavar="[DIR]", required=False)
@click.option("--keep", is_flag=True, help="Leave the hosts' masters running and DIR in place.")
def demo(directory: str | None, keep: bool) -> None:
    """Deploy the example app to two local hosts with `git push`, under load (<60 s)."""
    from pathlib import Path

    from deployer import demo as demos

    sys.exit(demos.run(Path(directory) if directory else None, keep, sys.stdout))


@cli.command(
    hidden=True, context_settings={"ignore_unknown_options": True, "help_option_names": []}
)
@click.argument("name", type=click.Choice(["pre-receive", "post-update"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def hook(name: str, args: tuple[str, ...]) -> None:
    """Entry point of the installed git hooks (run by git in the bare repo)."""
    from pathlib import Path

    from deployer import githooks

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    cfg = githooks.HookConfig.read(Path(os.environ.get("GIT_DIR", ".")).absolute())
    if name == "pre-receive":
        sys.exit(githooks.pre_receive(cfg, sys.stdin.read(), sys.stderr))
    try:
        code = githooks.post_update(cfg, list(args), sys.stdout)
    except BrokenPipeError:
        # The pusher went away; the rollout runs on in its own session.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


@cli.command()
@click.option("--force", is_flag=True, help="Break the lock even if its holder looks alive.")
@hosts_option
@click.pass_context
def unlock(ctx: click.Context, force: bool, patterns: str | None) -> None:
    """Break a stale deploy lock, saying whose it was."""
    from deployer import lock as locks

    with open_fleet(ctx, patterns) as session:
        broke = locks.break_locks(session, force)
    for line in broke:
        click.echo(line)


@cli.command()
def disconnect() -> None:
    """Stop the keeper ([ssh] persist): the SSH connections and agent sessions it
    keeps open between commands close now."""
    from deployer import keeper

    pid = keeper.stop()
    click.echo("no keeper was running" if pid is None else f"keeper (pid {pid}) stopped")
