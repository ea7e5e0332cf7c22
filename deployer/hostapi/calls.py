"""Agent calls as data: the argv the controller sends and the answer it expects.

`python3 <deploy_to>/.deployer/deployer.pyz agent OP --root <deploy_to> ARGS`;
the agent's parser (deployer/agent/cli.py) reads exactly these, which the
unit tests check by parsing every call built here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from deployer.hostapi import answers
from deployer.hostapi.layout import Layout

LOCK_ACTIONS = ("acquire", "release", "heartbeat", "show")
PREPARE_DEADLINE = 3600.0  # sync, extract and the app's build
MIGRATE_DEADLINE = 4 * 3600.0  # a phase of migrations, backfills included
LOCK_DEADLINE = 15.0  # also bounds cleanup: releasing the locks of a host that froze


# Runs the host's zipapp only if it is the controller's own: the bytes are read
# once (never through a symlink), hashed, and imported from an anonymous copy
# (memfd), so what runs is what was checked; another local user who could swap
# the file can only make it fail. Written to run on any Python, so that an old
# one is named rather than a SyntaxError.
BOOTSTRAP = """\
import sys
if sys.version_info < (3, 9):
    sys.stderr.write("deployer: the host agent needs Python 3.9 or later; %s is %s\\n"
                     % (sys.executable, sys.version.split()[0]))
    sys.exit(2)
import hashlib, os
path, want = sys.argv[1], sys.argv[2]
if path == "-":  # the zipapp itself comes on stdin: `agent setup --install`
    data = sys.stdin.buffer.read()
else:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        sys.stderr.write("deployer: cannot open the host agent %s: %s\\n" % (path, e.strerror))
        sys.exit(127 if e.errno == 2 else 2)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
if hashlib.sha256(data).hexdigest() != want:
    sys.stderr.write("deployer: the host agent %s is not this controller's "
                     "(sha256 differs): run `deployer setup`\\n" % path)
    sys.exit(2)
mem = os.memfd_create("deployer.pyz", 0)  # no CLOEXEC: a master upgrade may go back
os.write(mem, data)
sys.argv = [path] + sys.argv[3:]
sys.path.insert(0, "/proc/self/fd/%d" % mem)
from deployer.hostmain import main
sys.exit(main())
"""


def bootstrap_refusal(exit_code: int, stderr: str, pyz: str) -> str | None:
    """Why BOOTSTRAP did not run the host's zipapp, from its exit code and stderr
    (no agent at `pyz`, another one, an old Python); None if it ran it."""
    if exit_code == 127 and "cannot open the host agent" in stderr:
        return f"the host agent is not installed at {pyz}: run `deployer setup`"
    if exit_code == 2 and stderr.startswith("deployer: "):
        return stderr.removeprefix("deployer: ").strip()
    return None


def zipapp(python: str, pyz: str, digest: str, *words: str) -> list[str]:
    """A command of the host's zipapp (`agent ...`, `master ...`, `migrate ...`),
    run only if the zipapp's sha256 is `digest`; pyz "-": it comes on stdin."""
    return [python, "-c", BOOTSTRAP, pyz, digest, *words]


class AgentCall(NamedTuple):
    op: str
    args: tuple[str, ...]
    answer: type[tuple]
    root: bool = True  # the op works on a deploy root (--root)
    pyz_on_stdin: bool = False  # installs the zipapp it runs from
    # Wall-clock seconds the controller waits for the answer: a host that stops
    # answering (a frozen sshd) fails its step instead of hanging the command.
    deadline: float = 60.0
    # the same call again changes nothing more (a lookup, a switch to a named
    # release, a record the host keeps once): retried once on a fresh session when
    # the keeper relaying it went away before its answer came
    repeatable: bool = False

    def words(self, layout: Layout) -> list[str]:
        """What follows `agent`: the op and its arguments, as the agent's parser reads
        them (on a command line, or in a session request)."""
        root = ("--root", str(layout.root)) if self.root else ()
        return [self.op, *root, *self.args]

    def argv(self, python: str, layout: Layout, digest: str) -> list[str]:
        pyz = "-" if self.pyz_on_stdin else str(layout.pyz)
        return zipapp(python, pyz, digest, "agent", *self.words(layout))

    @property
    def in_session(self) -> bool:
        """Whether the call can be a request of the host's agent session: not one
        that installs the zipapp it runs from, replaces the agent (exec), or reads
        its stdin until the controller goes away (logs --follow)."""
        return not self.pyz_on_stdin and self.op not in ONE_SHOT_OPS and "--follow" not in self.args


# ops that never go through an agent session (see AgentCall.in_session)
ONE_SHOT_OPS = ("exec", "session")
SESSION_OP = "session"


def session(python: str, layout: Layout, digest: str) -> list[str]:
    """The agent in session mode (deployer/agent/session.py): the BOOTSTRAP hash
    check and interpreter start once, then requests on stdin, answers on stdout
    (framing: deployer.hostapi.answers.request_frame / end_frame)."""
    return zipapp(python, str(layout.pyz), digest, "agent", SESSION_OP)


def version() -> AgentCall:
    return AgentCall("version", (), answers.Version, root=False, repeatable=True)


def _role(role: str | None) -> tuple[str, ...]:
    """`--role R`: the op uses role R's master files (master-R.toml, run/master-R.*)."""
    return () if role is None else ("--role", role)


def setup(
    install: bool = False, master_toml: str | None = None, role: str | None = None
) -> AgentCall:
    """Create or check the layout. `install`: the zipapp, sent on stdin, is run
    from memory and writes itself into the layout once the layout is checked;
    `master_toml`: the master's options file (`role`'s), written if it changed."""
    args = ("--install",) if install else ()
    if master_toml is not None:
        args += ("--master-toml", master_toml)
    args += _role(role)
    return AgentCall("setup", args, answers.SetupResult, pyz_on_stdin=install)


def unit(app: str, supervisor: str, deadline: float = 300.0, role: str | None = None) -> AgentCall:
    """Install and enable the app's systemd unit (`supervisor` "auto" or "systemd"),
    or remove the one setup installed (`"none"`); where systemd runs, start it (it
    takes over a running master). `deadline`: a start waits for every worker."""
    args = ("--app", app, "--supervisor", supervisor, *_role(role))
    return AgentCall("unit", args, answers.UnitResult, deadline=deadline)


LIFECYCLE_ACTIONS = ("stop", "start", "remove", "purge")


def lifecycle(action: str, role: str | None = None) -> AgentCall:
    """ "stop": mark `role`'s master stopped (it stays down, a reboot too); "start": clear
    the mark; "remove": its master.toml, unit record and mark gone; "purge": deploy_to
    itself gone (the master stopped and the unit removed first, by their own calls)."""
    return AgentCall("lifecycle", (action, *_role(role)), answers.Lifecycle)


def state(role: str | None = None) -> AgentCall:
    """The releases, and the master of `role` (None: the implicit one)."""
    return AgentCall("state", _role(role), answers.HostState, repeatable=True)


def status(
    socket: str | None,
    url: str | None,
    expect: int,
    timeout: float,
    window: float,
    role: str | None = None,
) -> AgentCall:
    """State, the master's own account (crashes within `window` seconds), the lock and
    one health probe, in one call; every wait on the host within `timeout`. `role`:
    whose master (its pid file and unit)."""
    args = ("--timeout", str(timeout), "--window", str(window), *_role(role))
    if socket:
        args += ("--socket", socket)
    if url:
        args += ("--url", url, "--expect", str(expect))
    return AgentCall("status", args, answers.HostStatus, deadline=timeout, repeatable=True)


def prepare(
    revision: str,
    release: str,
    shared: Sequence[str] = (),
    build: str | None = None,
    receive: bool = False,
) -> AgentCall:
    """`receive`: a pack on stdin is indexed into repo/ first, in the same call."""
    args = ["--revision", revision, "--release", release]
    args += [a for path in shared for a in ("--shared", path)]
    if build:
        args += ["--build", build]
    if receive:
        args.append("--receive")
    return AgentCall("prepare", tuple(args), answers.PrepareResult, deadline=PREPARE_DEADLINE)


def switch(release: str, roles: Sequence[str | None] = ()) -> AgentCall:
    """Point `current` at `release`, and record it as the release of `roles` (None:
    the implicit one): what their workers should run, whatever later moves `current`."""
    args = ("--release", release)
    for role in roles:
        args += ("--for-role", role or "")
    return AgentCall("switch", args, answers.SwitchResult, repeatable=True)


def prune(keep: int) -> AgentCall:
    return AgentCall("prune", ("--keep", str(keep)), answers.PruneResult, repeatable=True)


def health(url: str, expect: int, timeout: float, passes: int, interval: float) -> AgentCall:
    args = ("--url", url, "--expect", str(expect), "--timeout", str(timeout))
    args += ("--passes", str(passes), "--interval", str(interval))
    # the host keeps `timeout` itself (deployer/agent/ops.py): this is the backstop
    deadline = timeout + 10
    return AgentCall("health", args, answers.HealthResult, root=False, deadline=deadline,
                     repeatable=True)  # fmt: skip


def watch(
    seconds: float,
    sockets: Sequence[str],
    urls: Sequence[tuple[str, int]] = (),
    window: float = 0.0,
) -> AgentCall:
    """Watch a switched host for `seconds`: a worker crash reported by one of its
    masters (`sockets`, one per role), a worker not ready, or a failing health
    probe (`urls`: each with the status it must answer) fails it. A crash in the
    `window` seconds before counts too (the time since the host's switch)."""
    args: tuple[str, ...] = ("--seconds", str(round(seconds, 2)))
    if window > 0:
        args += ("--window", str(round(window, 2)))
    for socket in sockets:
        args += ("--socket", socket)
    for url, expect in urls:
        args += ("--url", url, "--expect", str(expect))
    return AgentCall("watch", args, answers.WatchResult, deadline=seconds + 10, repeatable=True)


SECRET_ACTIONS = ("set", "unset", "list")


def workers(socket: str, release: str, lines: int, role: str | None = None) -> AgentCall:
    """What `role`'s master (on `socket`) saw of `release`'s workers: crashes, how
    many are ready, and the last `lines` lines they wrote to its log."""
    args = ("--socket", socket, "--release", release, "--lines", str(lines), *_role(role))
    return AgentCall("workers", args, answers.WorkerReport, deadline=20.0, repeatable=True)


def secrets(action: str, key: str | None = None) -> AgentCall:
    """`set KEY` takes the value on stdin: a secret is never on a command line."""
    if action not in SECRET_ACTIONS:
        raise ValueError(f"unknown secrets action {action!r}")
    return AgentCall("secrets", (action, *((key,) if key else ())), answers.Secrets)


def record(entry: dict[str, Any]) -> AgentCall:
    args = ("--entry", json.dumps(entry, sort_keys=True))
    return AgentCall("record", args, answers.Recorded, repeatable=True)  # kept once


def lock(
    action: str,
    owner: answers.LockOwner,
    force: bool = False,
    take_stale: float | None = None,
    replace: str | None = None,
) -> AgentCall:
    """`force`: release whoever holds it (unlock of a stale lock); `take_stale`:
    acquire over a lock whose heartbeat is older than that many seconds; `replace`:
    acquire over the lock of that holder id (one known to be dead)."""
    if action not in LOCK_ACTIONS:
        raise ValueError(f"unknown lock action {action!r}")
    args = (action, "--owner", json.dumps(owner.to_json(), sort_keys=True))
    args += ("--force",) if force else ()
    args += ("--take-stale", str(take_stale)) if take_stale is not None else ()
    args += ("--replace", replace) if replace is not None else ()
    # acquire again by the same owner is ours already; release of a released one, done
    return AgentCall("lock", args, answers.LockAnswer, deadline=LOCK_DEADLINE, repeatable=True)


# --- migrations: `deployer migrate ...` of the host's zipapp, the database URL on stdin
# (never on a command line)

MIGRATE_COMMANDS = ("status", "up", "down", "accept")  # what runs on the migrations host


def migrate(command: str, *args: str) -> tuple[str, ...]:
    if command not in MIGRATE_COMMANDS:
        raise ValueError(f"not a migrate command of the hosts: {command!r}")
    return ("migrate", command, *args, "--database", "-")


def migrate_up(
    phase: str, files: str, release: str | None = None, if_dir_exists: bool = False
) -> tuple[str, ...]:
    """One phase from `files` (a release's migrations dir), recorded as `release`'s;
    `if_dir_exists`: nothing to do where the release has no such dir."""
    args = ("--phase", phase, "--dir", files)
    args += ("--release", release) if release else ()
    args += ("--if-dir-exists",) if if_dir_exists else ()
    return migrate("up", *args)


def migrate_status(files: str) -> tuple[str, ...]:
    return migrate("status", "--json", "--dir", files)


def migrate_down(release: str, phase: str, files: str) -> tuple[str, ...]:
    """The down sections of what `release` applied in `phase`, from its own files."""
    return migrate("down", "--release", release, "--phase", phase, "--dir", files)


def master_start(layout: Layout) -> tuple[str, ...]:
    return ("master", "start", "--config", str(layout.master_config))


def master_reload(socket: str, timeout: float) -> tuple[str, ...]:
    return ("master", "reload", "--socket", socket, "--wait", "--timeout", str(timeout))


def master_upgrade(socket: str, layout: Layout, reconfigure: bool = False) -> tuple[str, ...]:
    """The new code is the zipapp just installed (named: the running master may
    have imported its own from an anonymous copy); `reconfigure`: and the options
    of the master.toml just written."""
    words = ("master", "upgrade", "--socket", socket, "--code", str(layout.pyz))
    if reconfigure:
        words += ("--config", str(layout.master_config), "--reconfigure")
    return words


def master_scale(socket: str, workers: int) -> tuple[str, ...]:
    return ("master", "scale", "--socket", socket, str(workers))


def master_stop(socket: str) -> tuple[str, ...]:
    return ("master", "stop", "--socket", socket)


# --- day-2: logs, exec, probe ---------------------------------------------------------

LOG_LINE = "|"  # every line of the log `agent logs` streams starts with this
LOG_LIVE = "@@deployer-logs live"  # follow: the backlog is out, new lines come from here on
LOG_ALIVE = "@@deployer-logs alive"  # follow: nothing new; a dead connection ends the op
FOLLOW_DEADLINE = 7 * 24 * 3600.0  # a follow ends when its stdin closes; this is the backstop


def logs(
    lines: int | None,
    since: str | None = None,
    follow: bool = False,
    poll: float = 0.25,
    role: str | None = None,
) -> AgentCall:
    """log/master.log: the last `lines` lines (None: no limit) stamped at or after
    `since` (the log's own form, `2026-12-01T11:01:55.333Z`); `follow`: then new
    lines as they come, by name across a reopen (SIGUSR1 rotation), until the
    op's stdin closes (the controller's Ctrl-C, or its connection gone)."""
    args: tuple[str, ...] = _role(role)
    if lines is not None:
        args += ("--lines", str(lines))
    if since is not None:
        args += ("--since", since)
    if follow:
        args += ("--follow", "--poll", str(poll))
    deadline = FOLLOW_DEADLINE + 60 if follow else 120.0
    return AgentCall("logs", args, answers.LogsResult, deadline=deadline)


def exec_command(argv: Sequence[str], role: str | None = None) -> AgentCall:
    """Run `argv` in current/ with the app's environment (master.toml's env, then
    the env_file secrets, both read on the host). The argv travels as one JSON word,
    so no shell ever re-splits it. On success the command replaces the agent (its
    output and exit code are the command's, stderr merged into stdout); the only
    answer the agent itself gives is a refusal (no release, a bad master.toml)."""
    if not argv:
        raise ValueError("exec: empty command")
    args = ("--argv", json.dumps(list(argv)), *_role(role))
    return AgentCall("exec", args, answers.ExecResult)


def probe(python: str, layout: Layout, digest: str, listen: str | None) -> list[str]:
    """A read-only look at a host that needs no agent (`deployer doctor`, `config
    --diff`): hostapi/probe.py run by `python -c`, with trust.py's checks of the
    layout, whose answer is an answers.Probe result line."""
    from pathlib import Path

    here = Path(__file__).parent
    source = (here / "probe.py").read_text()
    trust = (here / "trust.py").read_text()
    dirs = json.dumps([str(d) for d in layout.dirs()])
    role = () if layout.role is None else (layout.role,)  # that role's master files
    return [python, "-c", source, str(layout.root), digest, listen or "", dirs, trust, *role]
