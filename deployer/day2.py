"""Day-2 commands: the app's logs from every host (`app logs`), a command in the
app's environment on every host (`exec`), the resolved configuration and its drift
on the hosts (`config`), and a read-only preflight of each host (`doctor`).

Everything on a host goes through the host contract (deployer.hostapi): agent
calls `logs` and `exec`, and the agent-less probe (hostapi/probe.py) for what must
work before `deployer setup` ever ran.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import heapq
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from deployer.bundle import build
from deployer.errors import BadInput, DeployerError
from deployer.fleet import STATUS_WINDOW
from deployer.hostapi import answers, calls
from deployer.hostapi.checks import mask_url
from deployer.hostapi.options import LAYOUT_KEYS, MasterConfig, to_toml, toml_value
from deployer.inventory import HostConfig, Inventory, RoleConfig
from deployer.remote import RemoteHost
from deployer.report import printable
from deployer.session import FleetSession
from deployer.transport import LocalHost, Result

# --- output -------------------------------------------------------------------------------

_COLORS = ("36", "33", "32", "35", "34", "91", "96", "93", "92", "95")


class Prefixer:
    """`web1: ` before each line of a host; colored per host on a terminal."""

    def __init__(self, names: Sequence[str], stream: TextIO) -> None:
        tty = stream.isatty() and os.environ.get("TERM") != "dumb"
        color = tty and "NO_COLOR" not in os.environ
        self.prefix = {
            name: (f"\x1b[{_COLORS[i % len(_COLORS)]}m{name}\x1b[0m: " if color else f"{name}: ")
            for i, name in enumerate(names)
        }

    def __call__(self, name: str, text: str) -> str:
        return self.prefix.get(name, f"{name}: ") + printable(text)


def _short(e: BaseException, name: str) -> str:
    return str(e).removeprefix(f"{name}: ")


# --- app logs -----------------------------------------------------------------------------

STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) ")  # master/log.py timestamp()
_RELATIVE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)\s*")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
HOLD = 0.3  # follow: seconds a line waits for lines of other hosts that were written before it
BACKLOG_WAIT = 20.0  # follow: seconds the backlogs of slow hosts are waited for, merged
STOP_WAIT = 5.0  # seconds the streams get to end after Ctrl-C


def log_stamp(when: dt.datetime) -> str:
    """A time as master.log stamps lines: `2026-12-01T11:01:55.333Z` (UTC)."""
    utc = when.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


_SINCE_FORMS = (
    "expected a time like 2026-12-01T11:00:00 (local time, or with Z or +01:00) in the "
    "years 1 to 9999, or a duration ago like 30s, 10m, 1h, 2d"
)


def parse_since(text: str, now: dt.datetime | None = None) -> str:
    """`--since`: `10m`, `1h`, `2d`, `30s` ago, or an ISO time (`2026-12-01T11:00`,
    `2026-12-01 11:00:00Z`, `2026-12-01`; without a zone: this machine's local
    time). Returned as the log's own stamp, which the host compares as text."""
    try:
        return log_stamp(_since_time(text, now or dt.datetime.now(dt.UTC)))
    except (ValueError, OverflowError):
        # OverflowError: a duration or a zone that goes past year 1 or 9999
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise BadInput(f"--since {shown!r}: {_SINCE_FORMS}") from None


def _since_time(text: str, now: dt.datetime) -> dt.datetime:
    m = _RELATIVE.fullmatch(text)
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    when = dt.datetime.fromisoformat(text.strip())
    return when if when.tzinfo else when.astimezone()


def _until(stop: threading.Event) -> Iterator[bytes]:
    """A follow's stdin: nothing, and its end once `stop` is set (the agent stops)."""
    stop.wait()
    yield from ()


class _Merge:
    """Lines of several hosts, each host's kept in its order, merged by their stamps;
    an unstamped line (a traceback) goes with the stamped line before it."""

    def __init__(self, names: Sequence[str]) -> None:
        self.order = {n: i for i, n in enumerate(names)}
        self.last: dict[str, str] = dict.fromkeys(names, "")
        self.seq = 0

    def key(self, name: str, text: str) -> tuple[str, int, int]:
        m = STAMP.match(text)
        if m:
            self.last[name] = m.group(1)
        self.seq += 1
        return (self.last[name], self.order[name], self.seq)


def logs(
    session: FleetSession,
    lines: int | None,
    since: str | None,
    follow: bool,
    out: TextIO,
    err: TextIO,
    until_idle: float | None = None,
) -> int:
    """`deployer app logs`: 0, or 1 if a host's log could not be read. One stream per
    master: `web1` for a host's only master, `web1/worker` for a role's."""
    streams = {
        (n if role.name is None else f"{n}/{role.name}"): (remote, role.name)
        for n, remote in session.remotes.items()
        for role in (remote.config.masters or remote.config.roles[:1])
    }
    names = list(streams)
    show = Prefixer(names, out)
    merge = _Merge(names)
    events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    stop = threading.Event()

    def stream(name: str, remote: RemoteHost, role: str | None) -> None:
        def on_line(text: str) -> None:
            if text.startswith(calls.LOG_LINE):
                events.put(("line", name, text[len(calls.LOG_LINE) :]))
            elif text == calls.LOG_LIVE:
                events.put(("live", name, None))

        call = calls.logs(lines, since, follow, role=role)
        try:
            stdin = _until(stop) if follow else None
            answer: answers.LogsResult = remote.call(call, stdin=stdin, on_line=on_line)
            events.put(("end", name, answer))
        except DeployerError as e:
            events.put(("fail", name, _short(e, remote.name)))
        except Exception as e:  # a bug: said per host, never a hung command
            events.put(("fail", name, f"{type(e).__name__}: {e}"))

    for name, (remote, role) in streams.items():
        threading.Thread(target=stream, args=(name, remote, role), daemon=True).start()
    call = calls.logs(lines, since, follow)  # its deadline

    failed: dict[str, str] = {}
    ended: set[str] = set()

    def write(batch: list[tuple[tuple[str, int, int], str, str]]) -> None:
        for _key, name, text in batch:
            out.write(show(name, text) + "\n")
        out.flush()

    def settle(kind: str, name: str, value: Any) -> None:
        ended.add(name)
        if kind == "fail":
            failed[name] = value
            err.write(show(name, f"FAILED: {value}") + "\n")
        elif not value.exists and not follow:
            err.write(show(name, f"no log yet at {value.path} (no master has run here)") + "\n")
        err.flush()

    # The backlogs, merged: every host's, or what came of them in BACKLOG_WAIT.
    per_host: dict[str, list[tuple[tuple[str, int, int], str, str]]] = {n: [] for n in names}
    live: set[str] = set()
    end = time.monotonic() + (BACKLOG_WAIT if follow else call.deadline + 30)
    try:
        while len(live | ended) < len(names) and time.monotonic() < end:
            try:
                kind, name, value = events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "line":
                per_host[name].append((merge.key(name, value), name, value))
            elif kind == "live":
                live.add(name)
            else:
                settle(kind, name, value)
        write(list(heapq.merge(*(_backfilled(lines) for lines in per_host.values()))))
        if not follow:
            for name in names:
                if name not in ended:
                    failed[name] = "no answer in time"
                    err.write(show(name, "FAILED: no answer in time") + "\n")
            return 1 if failed else 0
        _live(events, merge, write, settle, ended, names, until_idle)
    except KeyboardInterrupt:
        pass
    stop.set()
    # the streams end as their stdin closes; what they still had is shown
    pending: list[tuple[tuple[str, int, int], str, str]] = []
    end = time.monotonic() + STOP_WAIT
    while len(ended) < len(names) and time.monotonic() < end:
        try:
            kind, name, value = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if kind == "line":
            pending.append((merge.key(name, value), name, value))
        elif kind in ("end", "fail"):
            settle(kind, name, value)
    write(sorted(pending))
    return 1 if failed else 0


def _backfilled(
    lines: list[tuple[tuple[str, int, int], str, str]],
) -> list[tuple[tuple[str, int, int], str, str]]:
    """A host's backlog whose first lines have no stamp (a traceback cut by -n): they
    go with the first stamped line after them."""
    first = next((key[0] for key, _, _ in lines if key[0]), "")
    return [((key[0] or first, *key[1:]), name, text) for key, name, text in lines]


def _live(
    events: queue.Queue[tuple[str, str, Any]],
    merge: _Merge,
    write: Any,
    settle: Any,
    ended: set[str],
    names: Sequence[str],
    until_idle: float | None,
) -> None:
    """Follow: lines as they come, each held HOLD seconds so that lines other hosts
    wrote before it (and sent a little later) come out first."""
    held: list[tuple[float, tuple[str, int, int], str, str]] = []
    last_line = time.monotonic()
    while len(ended) < len(names):
        try:
            kind, name, value = events.get(timeout=0.05)
            if kind == "line":
                last_line = time.monotonic()
                held.append((last_line, merge.key(name, value), name, value))
            elif kind in ("end", "fail"):
                settle(kind, name, value)
        except queue.Empty:
            pass
        now = time.monotonic()
        ripe = [h for h in held if h[0] <= now - HOLD]
        if ripe:
            held = [h for h in held if h[0] > now - HOLD]
            write(sorted((k, n, t) for _, k, n, t in ripe))
        if until_idle is not None and not held and now - last_line > until_idle:
            return
    write(sorted((k, n, t) for _, k, n, t in held))


# --- exec ---------------------------------------------------------------------------------


def _exec_argv(remote: RemoteHost, argv: Sequence[str]) -> list[str]:
    """With roles, the environment is the first (selected) role's master's."""
    role = next((r.name for r in remote.config.masters), None)
    call = calls.exec_command(argv, role)
    return call.argv(remote.config.ssh.python, remote.layout, build().sha256)


def _why_not_run(remote: RemoteHost, result: Result) -> str | None:
    """Why the agent did not run the command (a refusal, no agent), None if it ran."""
    tail = result.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    if tail.startswith(answers.RESULT_MARK):
        try:
            answers.parse_result(tail, answers.ExecResult)
        except answers.AgentFailed as e:
            return str(e)
        except ValueError:
            pass
    stderr = result.stderr_tail(5)
    if result.exit_code == 127 and "cannot open the host agent" in stderr:
        return f"the host agent is not installed at {remote.layout.pyz}: run `deployer setup`"
    if stderr.startswith("deployer: "):  # the bootstrap: another agent, an old Python
        return stderr.removeprefix("deployer: ")
    return None


def run_exec(
    session: FleetSession, argv: Sequence[str], parallel: int | None, out: TextIO, err: TextIO
) -> int:
    """`deployer exec`: argv in current/ on every host, `HOST: ` before each line of
    its output; 0 only if it exited 0 on every host, else 1, saying where not."""
    show = Prefixer(session.names, out)
    lock = threading.Lock()

    def one(remote: RemoteHost) -> tuple[int | None, str | None]:
        def line(text: str) -> None:
            if not text.startswith(answers.RESULT_MARK):
                with lock:
                    out.write(show(remote.name, text) + "\n")
                    out.flush()

        try:
            result = remote.transport.run(_exec_argv(remote, argv), on_stdout=line)
        except DeployerError as e:
            return None, _short(e, remote.name)
        if result.exit_code == 0:
            return 0, None
        why = _why_not_run(remote, result)
        if why is not None:
            return None, why
        with lock:
            for text in result.stderr.splitlines()[-20:]:
                err.write(show(remote.name, text) + "\n")
        return result.exit_code, None

    results, _ = session.each(session.names, one, limit=parallel)  # None: [rollout] parallel
    failed = []
    for name in session.names:
        code, why = results.get(name, (None, "no result"))
        if why is not None:
            err.write(show(name, f"FAILED: {why}") + "\n")
            failed.append(f"{name} (did not run)")
        elif code != 0:
            failed.append(f"{name} (exit {code})")
    if failed:
        total = len(session.names)
        err.write(
            f"deployer exec: failed on {len(failed)} of {total} host(s): {', '.join(failed)}\n"
        )
    err.flush()
    return 1 if failed else 0


def run_interactive(session: FleetSession, argv: Sequence[str]) -> int:
    """`deployer exec -i`: a console on one host, on a TTY there (like `ssh -t`);
    the command's exit code is said when it is not 0."""
    [name] = session.names
    remote = session.remotes[name]
    full = _exec_argv(remote, argv)
    if isinstance(remote.transport, LocalHost):  # this machine: our terminal is the TTY
        import subprocess

        code = subprocess.call(full)
    else:
        code = _pty_session(remote, full)
    if code != 0:
        sys.stderr.write(f"deployer exec: {name}: exit {code}\n")
        return 1
    return 0


def _pty_session(remote: RemoteHost, full: list[str]) -> int:
    import select
    import shutil
    import signal

    from deployer.errors import TransportError
    from deployer.transport import command_line

    conn = remote.transport.connection()  # type: ignore[attr-defined]
    chan = conn.transport.open_session(timeout=remote.config.ssh.connect_timeout)
    size = shutil.get_terminal_size()
    chan.get_pty(term=os.environ.get("TERM", "vt100"), width=size.columns, height=size.lines)
    chan.exec_command(command_line(full))
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    saved = None
    if os.isatty(fd_in):
        import termios
        import tty

        saved = termios.tcgetattr(fd_in)
        tty.setraw(fd_in)

    def resized(signum: int, frame: object) -> None:
        s = shutil.get_terminal_size()
        chan.resize_pty(width=s.columns, height=s.lines)

    old_winch = signal.signal(signal.SIGWINCH, resized)
    tail = b""
    try:
        reading = True
        while True:
            ready, _, _ = select.select([chan, *([fd_in] if reading else [])], [], [], 1.0)
            if chan in ready or chan.recv_ready():
                data = chan.recv(32768)
                if not data:
                    break
                tail = (tail + data)[-4096:]
                _write_all(fd_out, data)
            if reading and fd_in in ready:
                data = os.read(fd_in, 4096)
                if data:
                    chan.sendall(data)
                else:
                    reading = False
                    chan.shutdown_write()
            if chan.closed:
                break
        if not chan.exit_status_ready() and not chan.get_transport().is_active():
            raise TransportError(f"{remote.name}: connection lost during the session")
        code = chan.recv_exit_status()
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        if saved is not None:
            import termios

            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
        chan.close()
    text = tail.decode(errors="replace").replace("\r", "").rstrip("\n").rsplit("\n", 1)[-1]
    if code != 0 and text.startswith(answers.RESULT_MARK):
        try:
            answers.parse_result(text, answers.ExecResult)
        except answers.AgentFailed as e:
            raise DeployerError(f"{remote.name}: could not run the command: {e}") from None
        except ValueError:
            pass
    return code


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


# --- config -------------------------------------------------------------------------------


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def _master_values(cfg: MasterConfig) -> dict[str, Any]:
    """The options master.toml holds, as JSON values."""
    out: dict[str, Any] = {}
    for option, value in cfg.items():
        if option.key == "command":
            value = list(cfg.argv)
        elif option.key in ("ready", "stop_signal"):
            value = str(value) if option.key == "ready" else value.name
        out[option.key] = value
    return out


def _role_conf(host: HostConfig, role: RoleConfig) -> dict[str, Any]:
    master = host.master_config(role.name)
    return {
        "role": role.name,
        "master": None if master is None else _master_values(master),
        "master_toml": None
        if master is None
        else str(host.layout.for_role(role.name).master_config),
        "health": None if role.health is None else dataclasses.asdict(role.health),
        "env": dict(role.env),
        # "master.workers": "[hosts.big.master]": the table each value comes from
        "origins": dict(role.origins),
    }


def resolved(host: HostConfig, inv: Inventory) -> dict[str, Any]:
    """One host's configuration as deployer uses it: its tables merged (host's role
    table > host > role > top level), {host} and {address} expanded, each master as
    its master.toml has it, where each value comes from; passwords in URLs masked."""
    roles = [_role_conf(host, r) for r in host.roles]
    master = host.master_config()
    out = {
        "host": host.name,
        "address": host.address,
        "transport": host.transport,
        "ssh": None
        if host.transport == "local"
        else {"user": host.ssh.user, "port": host.port, "python": host.ssh.python},
        "app": dataclasses.asdict(host.app),
        "master": None if master is None else _master_values(master),
        "master_toml": None if master is None else str(host.layout.master_config),
        "health": None if host.health is None else dataclasses.asdict(host.health),
        "env": dict(host.env),
        "migrations": None if inv.migrations is None else dataclasses.asdict(inv.migrations),
        "roles": roles,
    }
    return _masked(out)


def render(conf: dict[str, Any]) -> list[str]:
    """A host's resolved configuration as TOML-like text (unset keys left out)."""
    where = conf["transport"] if conf["ssh"] is None else f"ssh {conf['ssh']['user'] or ''}"
    port = "" if conf["ssh"] is None else f" port {conf['ssh']['port']}"
    lines = [f"# {conf['host']}: {conf['address']} ({where.rstrip()}{port})"]
    _table(lines, "app", conf["app"])
    for role in conf["roles"]:
        prefix = "" if role["role"] is None else f"roles.{role['role']}."
        for section in ("master", "health", "env"):
            note = f"  # {role['master_toml']}" if section == "master" else ""
            _table(lines, prefix + section, role[section], note, role["origins"], section)
    _table(lines, "migrations", conf["migrations"])
    return lines


def _table(
    lines: list[str],
    name: str,
    table: dict[str, Any] | None,
    note: str = "",
    origins: dict[str, str] | None = None,
    section: str = "",
) -> None:
    """A [name] table; with `origins`, each key says which inventory table set it
    (`# default` if none did)."""
    if table is None:
        return
    lines.append(f"[{name}]{note}")
    for key, value in table.items():
        if value is None or (section == "master" and key == "env"):
            continue  # the env is its own table below
        shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)
        where = ""
        if origins is not None:
            source = origins.get(f"{section}.{key}")
            layout = section == "master" and key in LAYOUT_KEYS
            where = f"  # {source or ('layout' if layout else 'default')}"
        lines.append(f"{shown} = {toml_value(value)}{where}")


def _run_probe(
    remote: RemoteHost, listen: str | None, timeout: float, role: str | None = None
) -> answers.Probe:
    """The probe, reading `role`'s master files (None: master.toml, run/master.pid)."""
    layout = remote.layout.for_role(role)
    argv = calls.probe(remote.config.ssh.python, layout, build().sha256, listen)
    result = remote.transport.run(argv, timeout=timeout)
    try:
        answer = answers.parse_result(result.stdout, answers.Probe)
    except (answers.AgentFailed, ValueError) as e:
        raise ProbeFailed(f"garbled answer: {e}") from None
    if answer is None:
        raise ProbeFailed(_probe_error(remote, result))
    return answer


class ProbeFailed(DeployerError):
    pass


def _probe_error(remote: RemoteHost, result: Result) -> str:
    python = remote.config.ssh.python
    tail = result.stderr_tail(3) or result.stdout[-500:]
    if result.exit_code == 127:
        return f"{python} not found on the host ([ssh] python): {tail}"
    if "SyntaxError" in tail:
        return f"{python} is too old to run the probe (deployer needs 3.9 or later): {tail}"
    return f"`{python} -c <probe>` exited with {result.exit_code}: {tail}"


def _config_values(text: str, path: str) -> dict[str, Any]:
    from deployer.hostapi.options import ConfigError, load_text

    try:
        return load_text(text, path)
    except ConfigError as e:
        return {"(unreadable)": str(e)}


def _shown(value: Any) -> str:
    return "unset" if value is None else mask_url(toml_value(value))


def config_changes(host_text: str, expected: str, path: str) -> list[str]:
    """Each master option (each env variable) that differs: on the host vs written now."""
    have, want = _config_values(host_text, path), _config_values(expected, path)
    changes = []
    for key in dict.fromkeys([*want, *have]):
        if key == "env":
            env_have, env_want = have.get("env") or {}, want.get("env") or {}
            for var in dict.fromkeys([*env_want, *env_have]):
                if env_have.get(var) != env_want.get(var):
                    changes.append(
                        f"env {var}: {_shown(env_have.get(var))} on the host, "
                        f"{_shown(env_want.get(var))} from the inventory"
                    )
        elif have.get(key) != want.get(key):
            changes.append(
                f"{key}: {_shown(have.get(key))} on the host, "
                f"{_shown(want.get(key))} from the inventory"
            )
    return changes


def drift(session: FleetSession, timeout: float) -> list[dict[str, Any]]:
    """`config --diff`: per host, what differs from what `deployer setup` would make of
    the inventory now: master.toml (its options, its env) and the agent."""

    def one(remote: RemoteHost) -> dict[str, Any]:
        roles = [r.name for r in remote.config.masters] or [None]
        rows = [compare(remote, _run_probe(remote, None, timeout, role), role) for role in roles]
        first = rows[0]
        for other in rows[1:]:  # the agent's notes are the host's: said once
            first["notes"] += [n for n in other["notes"] if n not in first["notes"]]
            first["changes"] += other["changes"]
            first["diff"] += other["diff"]
            first["differs"] = first["differs"] or other["differs"]
        return first

    results, failures = session.each_within(session.names, one, timeout + 5)
    return [
        results[n]
        if n in results
        else {"host": n, "differs": True, "error": failures[n], "notes": [], "changes": []}
        for n in session.names
    ]


def compare(remote: RemoteHost, probe: answers.Probe, role: str | None = None) -> dict[str, Any]:
    """What on the host differs from what setup would write: the agent, and `role`'s
    master toml (a role's changes are prefixed with its name)."""
    notes: list[str] = []
    changes: list[str] = []
    diff: list[str] = []
    agent = probe.agent.get("state")
    if agent == "differs":
        notes.append("the host agent is not this controller's (`deployer setup` installs it)")
    elif agent == "missing":
        notes.append("no host agent installed (`deployer setup`)")
    elif agent != "same":
        notes.append(f"the host agent could not be checked: {probe.agent.get('error')}")
    master = remote.master_for(role)
    toml = probe.master_toml
    if master is None:
        notes.append("no [master] in the inventory: master.toml is not deployer's to compare")
    elif "error" in toml:
        notes.append(f"master.toml could not be read: {toml['error']}")
    elif not toml.get("exists"):
        notes.append(f"{toml.get('path')} is missing (`deployer setup` writes it)")
    else:
        expected = to_toml(master)
        if toml["text"] != expected:
            path = str(toml["path"])
            changes = config_changes(toml["text"], expected, path)
            if not changes:
                changes = ["the text differs (comments, order or layout), not the options"]
            if role is not None:
                changes = [f"{role}: {c}" for c in changes]
            diff = [
                mask_url(line)
                for line in difflib.unified_diff(
                    toml["text"].splitlines(),
                    expected.splitlines(),
                    fromfile=f"{remote.name}:{path}",
                    tofile="master.toml as `deployer setup` writes it now",
                    lineterm="",
                )
            ]
    differs = bool(changes) or any(not n.startswith("no [master]") for n in notes)
    return {
        "host": remote.name,
        "differs": differs,
        "error": None,
        "notes": notes,
        "changes": changes,
        "diff": diff,
    }


# --- doctor -------------------------------------------------------------------------------

MIN_FREE_MB = 100.0
MIN_FREE_SHARE = 0.05
MAX_SKEW_S = 5.0
MIN_PYTHON = (3, 9)


@dataclasses.dataclass
class Check:
    check: str
    status: str  # ok | FAIL | info | skip
    detail: str


def doctor(session: FleetSession, timeout: float) -> list[dict[str, Any]]:
    """`deployer doctor`: per host, one row per check, reading only. Connection
    attempts are cut to `timeout`: a host that does not answer is reported, not
    waited out."""
    hosts = shortened([r.config for r in session.remotes.values()], timeout)

    def one(remote: RemoteHost) -> list[Check]:
        return examine(remote, timeout)

    with FleetSession(session.inventory, hosts, session.state_dir, session.reporter) as quick:
        results, failures = quick.each_within(quick.names, one, timeout + 45)
    rows = []
    for n in session.names:
        checks = results.get(n) or [Check("ssh", "FAIL", failures.get(n, "no answer"))]
        rows.append(
            {
                "host": n,
                "ok": all(c.status != "FAIL" for c in checks),
                "checks": [dataclasses.asdict(c) for c in checks],
            }
        )
    return rows


REST = ("python", "disk", "layout", "systemd", "listen", "clock")


def examine(remote: RemoteHost, timeout: float) -> list[Check]:
    checks: list[Check] = []
    cfg = remote.config
    if isinstance(remote.transport, LocalHost):
        checks.append(Check("ssh", "info", 'transport = "local": this machine, no SSH'))
    else:
        where = f"{cfg.ssh.user + '@' if cfg.ssh.user else ''}{cfg.address}:{cfg.port}"
        try:
            remote.transport.connection()  # type: ignore[attr-defined]
        except DeployerError as e:
            checks.append(Check("ssh", "FAIL", _short(e, remote.name)))
            return checks + [Check(c, "skip", "not checked: no connection") for c in REST]
        checks.append(Check("ssh", "ok", f"{where}: connected, host key verified"))
    roles = [r.name for r in cfg.masters] or [None]
    master = remote.master_for(roles[0])
    listen = None if master is None else master.listen
    before = time.time()
    try:
        probe = _run_probe(remote, listen, 30.0, roles[0])
    except DeployerError as e:
        checks.append(Check("python", "FAIL", _short(e, remote.name)))
        return checks + [Check(c, "skip", "not checked: no python") for c in REST[1:]]
    after = time.time()
    checks.append(_python(probe, cfg.ssh.python))
    checks.append(_disk(probe.disk, cfg.app.deploy_to))
    checks.append(_layout(probe, cfg.app.deploy_to, remote.layout.dirs()))
    checks.append(_systemd(probe.systemd, [m for r in cfg.masters if (m := r.master)]))
    if probe.agent.get("state") == "same":  # set up: each master's unit, as status reads it
        checks += [_boot(remote, role, timeout) for role in roles]
    checks.append(_listen(probe.listen, listen, roles[0]))
    for role in roles[1:]:  # each role's master binds its own listen, or none
        other = remote.master_for(role)
        spec = None if other is None else other.listen
        found = _run_probe(remote, spec, 30.0, role).listen if spec else {}
        checks.append(_listen(found, spec, role))
    checks.append(_clock(probe.time, before, after))
    return checks


def _python(probe: answers.Probe, python: str) -> Check:
    try:
        version = tuple(int(x) for x in probe.python.split(".")[:2])
    except ValueError:
        return Check("python", "FAIL", f"{python}: unreadable version {probe.python!r}")
    text = f"{probe.python} ({probe.executable})"
    if version < MIN_PYTHON:
        return Check("python", "FAIL", f"{text}: the host agent needs Python 3.9 or later")
    return Check("python", "ok", text)


def _disk(disk: dict[str, Any], deploy_to: str) -> Check:
    if "error" in disk:
        return Check(
            "disk", "FAIL", f"could not measure the space under {deploy_to}: {disk['error']}"
        )
    mb = 1024 * 1024
    free, total = disk["free"], disk["total"]
    share = free / total if total else 0.0
    text = f"{free / mb:.1f} MB free of {total / mb:.1f} MB ({share:.0%}) under {disk['path']}"
    if free / mb < MIN_FREE_MB:
        return Check("disk", "FAIL", f"{text}: less than {MIN_FREE_MB:g} MB")
    if share < MIN_FREE_SHARE:
        return Check("disk", "FAIL", f"{text}: less than {MIN_FREE_SHARE:.0%} free")
    return Check("disk", "ok", text)


def _layout(probe: answers.Probe, deploy_to: str, remote_dirs: Sequence[Any]) -> Check:
    lay, user = probe.layout, probe.user.get("name", "?")
    state = lay.get("state")
    if "error" in lay:
        return Check("layout", "FAIL", f"could not check {deploy_to}: {lay['error']}")
    if state == "missing":
        if not lay.get("writable"):
            return Check(
                "layout", "FAIL",
                f"{deploy_to} does not exist and {user} cannot create it "
                f"({lay.get('parent')} is not writable by {user})",
            )  # fmt: skip
        return Check("layout", "ok", f"{deploy_to} not set up yet: run `deployer setup`")
    if state == "untrusted":
        return Check("layout", "FAIL", str(lay.get("why")))
    if state == "not-writable":
        dirs = ", ".join(lay.get("dirs") or [])
        return Check("layout", "FAIL", f"not writable by {user}: {dirs}")
    if state == "incomplete":
        missing = [os.path.basename(d) for d in lay.get("missing") or []]
        if len(missing) == len(remote_dirs):  # an empty directory, made for setup
            return Check("layout", "ok", f"{deploy_to} not set up yet: run `deployer setup`")
        lacks = ", ".join(missing)
        return Check("layout", "ok", f"{deploy_to} lacks {lacks}: `deployer setup` makes them")
    agent = {"same": "agent up to date", "differs": "agent differs: `deployer setup`"}.get(
        str(probe.agent.get("state")), "no agent: `deployer setup`"
    )
    return Check("layout", "ok", f"{deploy_to} is {user}'s alone and writable; {agent}")


def _systemd(sd: dict[str, Any], masters: Sequence[MasterConfig]) -> Check:
    if "error" in sd:
        return Check("systemd", "info", f"could not tell: {sd['error']}")
    if sd.get("running"):
        return Check("systemd", "info", "running: `deployer setup` installs a unit for the master")
    text = "not running here: nothing brings the master back after a reboot"
    if any(m.supervisor == "systemd" for m in masters):
        return Check("systemd", "FAIL", f'{text}, and [master] supervisor = "systemd" needs it')
    return Check("systemd", "info", text)


def _boot(remote: RemoteHost, role: str | None, timeout: float) -> Check:
    """Would `role`'s master come back after a reboot: what its unit runs at boot exists
    and is this role's (the status call's boot answer)."""
    name = "boot" if role is None else f"boot {role}"
    try:
        boot = remote.status(min(timeout, 10.0), STATUS_WINDOW, role).boot
    except DeployerError as e:
        return Check(name, "FAIL", _short(e, remote.name))
    if boot is None:
        return Check(name, "info", "the host agent does not report it")
    if boot.comes_back:
        return Check(name, "ok", boot.why)
    return Check(name, "FAIL" if boot.unit else "info", boot.why)


def _listen(found: dict[str, Any], listen: str | None, role: str | None = None) -> Check:
    name = "listen" if role is None else f"listen {role}"
    if not listen:
        what = "[master]" if role is None else f"role {role}'s master"
        return Check(name, "info", f"no {what} listen in the inventory (binds no socket)")
    state = found.get("state")
    if state == "free":
        return Check(name, "ok", f"{listen} is free")
    if state == "ours":
        return Check(name, "ok", f"{listen} is served by this app's master (pid {found['pid']})")
    why = found.get("why") or found.get("error") or state
    return Check(name, "FAIL", f"{listen}: {why}")


def _clock(host_time: float, before: float, after: float) -> Check:
    skew = host_time - (before + after) / 2
    margin = (after - before) / 2
    ahead = "ahead of" if skew >= 0 else "behind"
    text = f"{abs(skew):.2f} s {ahead} this machine (±{margin:.2f} s)"
    if abs(skew) - margin > MAX_SKEW_S:
        return Check("clock", "FAIL", f"{text}: more than {MAX_SKEW_S:g} s")
    return Check("clock", "ok", text)


def shortened(hosts: Sequence[HostConfig], seconds: float) -> list[HostConfig]:
    """The hosts with connection attempts cut to `seconds` (a doctor reports a host
    that does not answer, it does not wait it out)."""
    return [
        dataclasses.replace(
            h,
            ssh=dataclasses.replace(
                h.ssh,
                retry_deadline=min(h.ssh.retry_deadline, seconds),
                connect_timeout=min(h.ssh.connect_timeout, seconds),
            ),
        )
        for h in hosts
    ]
