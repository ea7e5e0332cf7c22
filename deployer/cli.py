"""The `deployer` command: parse, call, print, exit code. Nothing else lives here.

Imports of anything heavy (fabric, paramiko, git, rich) happen inside the
commands that need them, so `deployer --help` starts fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from deployer import __version__
from deployer.errors import EXIT_BAD_INPUT, BadInput, DeployerError

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
    from deployer.inventory import Invalid, batch

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


def _lock_wait() -> Callable[[Any], float]:
    from deployer.hostapi.checks import seconds

    return seconds(0.0, inclusive=True)


def _canary() -> Callable[[Any], int]:
    from deployer.inventory import MAX_HOSTS, integer

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
@click.option("--canary", type=int, callback=checked(_canary), help="Hosts in the first batch.")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--repo", "repo_path", metavar="PATH", help="Repository to deploy from.")
@click.option(
    "--lock-wait", type=float, default=0.0, metavar="SECONDS", callback=checked(_lock_wait)
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
            outcome = run_rollout(session, plan, source, deploy_id, log_file, pre_deploy_done)
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
    from deployer.report import Reporter

    with open_fleet(ctx, patterns, reporter=Reporter(sys.stderr)) as session:
        rows = fleet.status(session, timeout)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            click.echo(status_line(r))
            for problem in r["problems"]:
                click.echo(f"  - {problem}")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


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
    import os
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


# --- day-2: app logs, exec, config, doctor (applogs, execute, drift, doctor) ---


@cli.command()
def disconnect() -> None:
    """Stop the keeper ([ssh] persist): the SSH connections and agent sessions it
    keeps open between commands close now."""
    from deployer import keeper

    pid = keeper.stop()
    click.echo("no keeper was running" if pid is None else f"keeper (pid {pid}) stopped")


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
    from deployer.report import Reporter, printable

    if not diff:
        inv = load_inventory(ctx)
        confs = [drift.resolved(h, inv) for h in selected(ctx, inv, patterns)]
        if as_json:
            click.echo(json.dumps(confs, indent=2))
            return
        for i, conf in enumerate(confs):
            click.echo(("\n" if i else "") + "\n".join(printable(x) for x in drift.render(conf)))
        return
    with open_fleet(ctx, patterns, reporter=Reporter(sys.stderr)) as session:
        rows = drift.drift(session, timeout)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            verdict = "DIFFERS" if r["differs"] else "same as the inventory"
            error = f": {r['error']}" if r["error"] else ""
            click.echo(printable(f"{r['host']}: {verdict}{error}"))
            for line in [*r["notes"], *r["changes"]]:
                click.echo(printable(f"  - {line}"))
            for line in r.get("diff") or []:
                click.echo(printable(line))
    if any(r["differs"] for r in rows):
        sys.exit(1)


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
    from deployer.report import Reporter, printable

    with open_fleet(ctx, patterns, reporter=Reporter(sys.stderr)) as session:
        rows = doctor.doctor(session, timeout)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            for c in r["checks"]:
                line = f"{r['host']}: {c['check']:<8} {c['status']:<4} {c['detail']}"
                click.echo(printable(line))
    if not all(r["ok"] for r in rows):
        sys.exit(1)


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


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the same path as Ctrl-C, so locks are released on the way out.
    raise KeyboardInterrupt


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

    from deployer.migrating import REMOTE_COMMANDS, on_host
    from deployer.migrations.cli import main as migrate_main

    argv = list(args)
    local = "--local" in argv or any(a.split("=")[0] == "--database" for a in argv)
    argv = [a for a in argv if a != "--local"]
    remote = argv and argv[0] in REMOTE_COMMANDS and not local
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected errors become a message and an exit code.

    As the program (no `argv` given), it ends without the interpreter's teardown of
    fabric, paramiko and GitPython (~60 ms, a tenth of a rollback): every file and
    connection is closed by then, the output flushed. Not the master's commands:
    `master run` is a long-lived process with its own shutdown."""
    rest = verbatim_master_args(sys.argv[1:] if argv is None else argv)
    if rest is not None:
        from deployer.master.cli import main as master_main

        sys.exit(master_main(rest))
    try:
        _main(argv)
        code: object = 0
    except SystemExit as e:
        code = e.code
    if argv is None and (code is None or isinstance(code, int)):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to say
                stream.flush()
        os._exit(code or 0)
    sys.exit(code)


def _main(argv: list[str] | None) -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
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
        from deployer.report import printable

        # the message may carry a host's or a build's output (a stderr tail)
        click.echo(printable(f"deployer: {e}"), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        # now: not once the threads still waiting on a remote step reach its deadline
        os._exit(130)
