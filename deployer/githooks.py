"""`git push deploy main`: the bare deploy repository and its hooks.

`deployer init` creates (or adopts) a bare repository, records the inventory and
the deploy branch in its git config, and installs the scripts of the project's
top-level `hooks/` directory; each runs `deployer hook NAME` with the Python that
ran init. A hook already there that is not ours is kept as `NAME.chained` and
run first (same arguments, same stdin); its refusal is the push's refusal.

pre-receive rejects a push to the deploy branch while another rollout holds the
lock, when the inventory does not validate, or when the migrations the push adds
or changes fail lint. post-update starts `deployer rollout <sha>` detached from
the push (its own session, output to `<repo>/deployer/logs/<id>.log`) and
follows that log for the pusher, so a pusher who disconnects stops only the
following, never the rollout.
"""

from __future__ import annotations

import getpass
import os
import posixpath
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from deployer import runlog
from deployer.errors import BadInput, DeployerError
from deployer.report import printable

if TYPE_CHECKING:
    from deployer.inventory import Inventory

HOOKS = ("pre-receive", "post-update")
MARK = "deployer-hook"  # in every script we install: tells ours from a foreign hook
ZERO = "0" * 40
CHUNK = 64 * 1024
MAX_PENDING = 1 << 20
# Variables git sets for hooks that must not leak into git commands run on other
# repositories (the app's own checkout, the hosts' repo/). GIT_SSH* and GIT_TRACE*
# are the user's own settings and stay.
KEEP_GIT_VARS = ("GIT_SSH", "GIT_TRACE")
# A rollout's id, as start_rollout makes it: `<release name>-<4 digits>`; its log is
# `<id>.log`. `deployer logs` takes an id or a prefix of one, nothing else: never a
# path or a glob.
LOG_ID = re.compile(r"\d{14}-[0-9a-f]{7}-\d{4}")
LOG_ID_PREFIX = re.compile(r"\d{1,14}|\d{14}-[0-9a-f]{0,7}|\d{14}-[0-9a-f]{7}-\d{0,4}")


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The hook's environment minus git's per-repository variables (GIT_DIR,
    GIT_QUARANTINE_PATH, GIT_OBJECT_DIRECTORY, GIT_PUSH_OPTION_*, ...)."""
    env = dict(os.environ if env is None else env)
    return {k: v for k, v in env.items() if not k.startswith("GIT_") or k.startswith(KEEP_GIT_VARS)}


def git_bytes(repo: Path, *args: str, env: dict[str, str] | None = None) -> bytes:
    proc = subprocess.run(["git", "--git-dir", str(repo), *args], capture_output=True, env=env)
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip()
        raise DeployerError(f"git {' '.join(args)} in {repo}: {why}")
    return proc.stdout


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    # replaced, not refused: a byte that is not UTF-8 must never be a traceback
    return git_bytes(repo, *args, env=env).decode(errors="replace")


def hooks_source() -> Path:
    """The project's top-level hooks/: beside the package in a checkout or an
    editable install, or under <prefix>/share/deployer/hooks in a wheel install."""
    here = Path(__file__).resolve().parent.parent / "hooks"
    for candidate in (here, Path(sys.prefix) / "share" / "deployer" / "hooks"):
        if all((candidate / name).is_file() for name in HOOKS):
            return candidate
    raise DeployerError(f"hook scripts not found in {here} (is the package installed whole?)")


# --- init ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookConfig:
    """What init records in the bare repo's git config."""

    repo: Path
    inventory: Path
    branch: str
    destination: str | None = None  # `deployer -d NAME init`: pushes here deploy NAME

    @classmethod
    def read(cls, repo: Path) -> HookConfig:
        def get(key: str) -> str:
            try:
                value = git(repo, "config", "--get", key).strip()
            except DeployerError:
                value = ""
            if not value:
                raise BadInput(
                    f"{repo}/config: {key} is not set; run `deployer init --repo {repo}`"
                )
            return value

        try:
            destination = git(repo, "config", "--get", "deployer.destination").strip() or None
        except DeployerError:
            destination = None
        if destination is not None:
            from deployer.inventory import check_destination

            check_destination(destination)
        return cls(repo, Path(get("deployer.inventory")), get("deployer.branch"), destination)

    @property
    def ref(self) -> str:
        return f"refs/heads/{self.branch}"


def init(
    repo: Path, inventory: Path, branch: str, python: str, destination: str | None = None
) -> list[str]:
    """Create or adopt the bare repo and install the hooks; returns what changed
    (empty when everything already was as asked). With a destination, its pushes
    deploy that destination (`-d NAME`)."""
    from deployer import inventory as inventories

    # a push must never be the first to find it broken
    inventories.load(str(inventory), destination)
    check_branch(branch)
    changes: list[str] = []
    if not repo.exists() or (repo.is_dir() and not any(repo.iterdir())):
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "--quiet", "--bare", f"--initial-branch={branch}")
        changes.append(f"created bare repository {repo}")
    elif not is_bare(repo):
        raise BadInput(f"--repo: {repo} is not a bare git repository (nor an empty directory)")
    settings = [
        ("deployer.inventory", str(inventory)),
        ("deployer.branch", branch),
        ("deployer.destination", destination),
    ]
    for key, value in settings:
        try:
            old = git(repo, "config", "--get", key).strip()
        except DeployerError:
            old = None
        if old != value and value is None:
            git(repo, "config", "--unset", key)
            changes.append(f"unset {key} (no -d: pushes deploy the inventory itself)")
        elif old != value and value is not None:
            git(repo, "config", key, value)
            changes.append(f"set {key} = {value}")
    # Hooks run in the repo with an inherited environment; never let a ref update
    # race a half-written hook: each script is written beside and renamed.
    source = hooks_source()
    for name in HOOKS:
        changes += install_hook(repo / "hooks" / name, source / name, python)
    return changes


def is_bare(repo: Path) -> bool:
    proc = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--is-bare-repository"],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def check_branch(branch: str) -> None:
    if subprocess.run(
        ["git", "check-ref-format", "--branch", branch], capture_output=True
    ).returncode:
        raise BadInput(f"--branch: {branch!r} is not a valid branch name")


def install_hook(target: Path, template: Path, python: str) -> list[str]:
    text = template.read_text().replace("@PYTHON@", shlex.quote(python))
    changes = []
    if target.exists() and MARK not in target.read_text(errors="replace"):
        chained = target.with_name(target.name + ".chained")
        if chained.exists():
            raise BadInput(
                f"{target} is a foreign hook and {chained} exists too: merge them by hand"
            )
        target.rename(chained)
        changes.append(f"kept the existing {target.name} hook as {chained.name} (run first)")
    if target.exists() and target.read_text() == text:
        return changes
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.rename(target)
    changes.append(f"installed hooks/{target.name}")
    return changes


def remote_lines(repo: Path) -> list[str]:
    """The `git remote add` lines for this machine and for others (ssh URL)."""
    user = getpass.getuser()
    return [
        f"git remote add deploy {repo}",
        f"git remote add deploy ssh://{user}@{socket.getfqdn()}{repo}",
    ]


# --- running hooks ---------------------------------------------------------------------


def run_chained(cfg: HookConfig, name: str, args: Iterable[str], stdin: str) -> int:
    chained = cfg.repo / "hooks" / f"{name}.chained"
    if not os.access(chained, os.X_OK):
        return 0
    return subprocess.run([str(chained), *args], input=stdin, text=True).returncode


def pre_receive(cfg: HookConfig, stdin: str, err: TextIO) -> int:
    """0 accepts the push; anything else rejects it, with a reason on `err`."""
    code = run_chained(cfg, "pre-receive", (), stdin)
    if code:
        return code
    for line in stdin.splitlines():
        old, new, ref = line.split()
        if ref != cfg.ref or new == ZERO:
            continue  # other branches, and deleting the deploy branch, deploy nothing
        try:
            check_push(cfg, old, new, lambda text: err.write(f"deployer: {text}\n"))
        except DeployerError as e:
            first, *rest = str(e).splitlines() or [""]
            err.write(f"deployer: push to {cfg.branch} rejected: {first}\n")
            err.writelines(f"deployer:   {r}\n" for r in rest)
            return 1
    return 0


def check_push(cfg: HookConfig, old: str, new: str, say: Callable[[str], None]) -> None:
    from deployer import inventory as inventories
    from deployer.history import state_dir
    from deployer.lock import ControllerLock, describe

    try:
        inv = inventories.load(str(cfg.inventory), cfg.destination)
    except DeployerError as e:
        raise BadInput(f"the inventory does not validate:\n{e}") from None
    lock = ControllerLock(state_dir(str(cfg.inventory), cfg.destination), inv.app.name)
    holder = lock.holder()
    if holder is not None:
        raise BadInput(f"another rollout is running: {describe(holder, 'deploy lock')}")
    if inv.migrations is not None:
        lint_pushed(cfg.repo, old, new, inv.migrations.dir, inv.migrations.database)
    pre_deploy(cfg, inv, new, say)


def pre_deploy(cfg: HookConfig, inv: Inventory, sha: str, say: Callable[[str], None]) -> None:
    """The controller's pre-deploy hook (a deploy freeze, a CI check) for the pushed
    revision, before the ref moves: its refusal rejects the push. The rollout that
    post-update starts then does not run it again (--pre-deploy-done)."""
    from deployer.deploy_hooks import DeployHooks

    hosts = list(inv.hosts)  # a push deploys every host, in every role
    hooks = DeployHooks(str(cfg.inventory), say, "rollout", inv.app.name, inv.destination, hosts)
    hooks.revision, hooks.roles = sha, list(inv.roles)
    hooks.pre_deploy()


def lint_pushed(repo: Path, old: str, new: str, directory: str, database: str) -> None:
    """Lint the migration files this push adds or changes (the quarantined objects
    are readable: git gives the hook the environment that sees them). Each is read
    from git as bytes and named by its path in the repository."""
    from deployer.migrating import dialect
    from deployer.migrations.files import parse_all
    from deployer.migrations.lint import lint

    names = _pushed_migrations(repo, old, new, posixpath.normpath(directory.strip("/")))
    if not names:
        return
    blobs = ((Path(name), git_bytes(repo, "show", f"{new}:{name}")) for name in names)
    violations = lint(parse_all(blobs), dialect(database))
    if violations:
        raise BadInput(
            f"{len(violations)} unsafe migration statement(s) ({violations[0].rule} in "
            f"{violations[0].migration}); fix them or allow a rule with "
            "`-- deployer: allow <rule>`\n" + "\n".join(str(v) for v in violations)
        )


def _pushed_migrations(repo: Path, old: str, new: str, directory: str) -> list[str]:
    """The migration files directly in `directory` that the push adds or changes."""
    from deployer.migrations.files import is_candidate

    if old == ZERO:
        listing = ["ls-tree", "-r", "-z", "--name-only", new, "--", directory]
    else:
        listing = ["diff", "-z", "--name-only", "--diff-filter=AMR", old, new, "--", directory]
    # -z: names as they are (no quoting), whatever bytes they hold
    names = [os.fsdecode(n) for n in git_bytes(repo, *listing).split(b"\0") if n]
    return [
        n
        for n in names
        if (posixpath.dirname(n) or ".") == directory and is_candidate(posixpath.basename(n))
    ]


def post_update(cfg: HookConfig, refs: list[str], out: TextIO) -> int:
    code = run_chained(cfg, "post-update", refs, "")
    if code:
        out.write(f"deployer: post-update.chained exited {code}; not deploying\n")
        return code
    if cfg.ref not in refs:
        out.write(
            f"deployer: {', '.join(refs)} is not the deploy branch ({cfg.branch}): not deployed\n"
        )
        return 0
    try:
        sha = git(cfg.repo, "rev-parse", "--verify", "--quiet", cfg.ref).strip()
    except DeployerError:
        out.write(f"deployer: {cfg.ref} was deleted: nothing to deploy\n")
        return 0
    run = start_rollout(cfg, sha)
    out.write(f"deployer: rollout {run.id} of {sha[:12]} started; log: {run.log}\n")
    out.flush()
    started = time.monotonic()
    follow(run.log, lambda: run.proc.poll() is None, out)
    code = run.proc.wait()
    if runlog.read_verdict(run.log) is None:  # killed before it could say
        why = f"the rollout ended ({code}) without a verdict; see {run.log}"
        out.write(runlog.verdict_line(code or 1, why) + "\n")
    out.write(summary(cfg, run, code, started) + "\n")
    out.flush()
    return code


@dataclass
class Run:
    id: str
    log: Path
    proc: subprocess.Popen[bytes]


def start_rollout(cfg: HookConfig, sha: str) -> Run:
    """`deployer rollout` in a session of its own, so the pusher's disconnect (SIGHUP,
    SIGPIPE on the hook's stdout) never reaches it; its output goes to the log."""
    from deployer.deploy_hooks import performer
    from deployer.history import private_state, state_dir
    from deployer.private import opener, private_dir

    deploy_id = runlog.new_id(sha)
    # a rollout log says who deployed what, when, from where: for our user only
    logs = private_dir(cfg.repo / "deployer" / "logs")
    log = logs / f"{deploy_id}.log"
    # `deployer logs` finds logs through the controller's state dir.
    index = private_state(state_dir(str(cfg.inventory), cfg.destination), "logs")
    (index / log.name).symlink_to(log)
    argv = [sys.executable, "-P", "-m", "deployer", "-i", str(cfg.inventory)]
    argv += ["-d", cfg.destination] if cfg.destination else []
    argv += ["rollout", sha]
    argv += ["--repo", str(cfg.repo), "--deploy-id", deploy_id, "--log-file", str(log)]
    argv += ["--pre-deploy-done"]  # pre-receive ran it for this revision
    with open(log, "wb", opener=opener) as fh:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=cfg.repo,
            # who pushed, worked out here: the pusher's SSH session (its auth info
            # file) ends with the push, the rollout goes on
            env={**clean_env(), "PYTHONUNBUFFERED": "1", "DEPLOYER_PERFORMER": performer()},
            start_new_session=True,
        )
    return Run(deploy_id, log, proc)


def open_log(log: Path) -> TextIO:
    """A rollout log for reading: undecodable bytes replaced, not fatal."""
    try:
        return open(log, errors="replace")
    except OSError as e:
        raise DeployerError(f"cannot read rollout log {log}: {e.strerror or e}") from None


def follow(log: Path, alive: Callable[[], bool], out: TextIO, poll: float = 0.1) -> None:
    """Copy `log` to `out` as it grows, until `alive()` is false and it is read to
    the end. A pusher who went away (EPIPE) ends the copying, nothing else."""
    with open_log(log) as fh:
        pending = ""
        while True:
            running = alive()
            chunk = fh.read(CHUNK)
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                if len(pending) > MAX_PENDING:  # a line without end: show it in parts
                    lines, pending = [*lines, pending], ""
                try:
                    out.writelines(printable(line) + "\n" for line in lines)
                    out.flush()
                except (BrokenPipeError, OSError):
                    return
            elif not running:
                if pending:
                    out.write(printable(pending) + "\n")
                return
            else:
                time.sleep(poll)


def summary(cfg: HookConfig, run: Run, code: int, started: float) -> str:
    """One line for the pusher: revision, hosts, duration, result."""
    from deployer.history import History, state_dir

    entry = next(
        (
            e
            for e in History(state_dir(str(cfg.inventory), cfg.destination)).entries(50)
            if e.get("id") == run.id
        ),
        None,
    )
    took = f"{time.monotonic() - started:.1f}s"
    if entry is None:
        return f"deployer: rollout {run.id} exited {code} after {took} (see {run.log})"
    hosts = ", ".join(entry.get("hosts", []))
    hosts = f"{cfg.destination} ({hosts})" if cfg.destination else hosts
    result = "ok" if entry.get("result") == "ok" else f"FAILED at {entry.get('failed_step')}"
    return printable(
        f"deployer: {str(entry.get('revision'))[:12]} to {hosts}: {result} "
        f"in {entry.get('duration_s')}s (exit {code}, log {run.log})"
    )


def check_log_id(deploy_id: str) -> str:
    if not LOG_ID_PREFIX.fullmatch(deploy_id):
        raise BadInput(
            f"no log matches {deploy_id!r}: ID must be a rollout id like "
            "20250102030405-abc1234-0042 (UTC stamp, short sha, number) or a prefix of one"
        )
    return deploy_id


def log_path(state: Path, deploy_id: str | None) -> Path:
    """A rollout's log by id (or a unique prefix of it), or the newest one."""
    prefix = "" if deploy_id is None else check_log_id(deploy_id)
    index = state / "logs"
    # ids start with a UTC stamp: name order is age order. Only our own logs count:
    # whatever else lies in the directory is not a rollout's.
    found = index.glob(f"{prefix}*.log") if index.is_dir() else []
    logs = sorted(p for p in found if LOG_ID.fullmatch(p.stem))
    exact = [p for p in logs if p.stem == deploy_id]
    if exact or (logs and not deploy_id) or len(logs) == 1:
        return (exact or logs)[-1]
    if not logs:
        what = f"no log matches {deploy_id!r}" if deploy_id else "no rollout logs yet"
        raise BadInput(f"{what} in {index}")
    raise BadInput(f"{deploy_id!r} matches {len(logs)} logs: {', '.join(p.stem for p in logs)}")


def copy_file(src: Path, out: TextIO) -> None:
    """A log to a terminal, its control characters made visible (see report.printable)."""
    with open_log(src) as fh:
        while chunk := fh.read(CHUNK):
            out.write(printable(chunk))
