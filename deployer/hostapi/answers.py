"""Typed answers of the host agent, with their JSON form.

The agent prints one result line, `RESULT_MARK {"ok": true, ...fields}` or
`RESULT_MARK {"ok": false, "error": "..."}`; the controller turns it back into
the record of the call it made. NamedTuples, not dataclasses: every agent call
imports this, and `dataclasses` costs a few ms a start.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple, TypeVar

from deployer.hostapi.exits import EXIT_BAD_INPUT, EXIT_FAILED

RESULT_MARK = "@@deployer-result"

T = TypeVar("T", bound=tuple)


def _load(cls: type[T], data: dict[str, Any]) -> T:
    """A record from a JSON object: its own fields only, defaults for the missing."""
    return cls(**{k: data[k] for k in cls._fields if k in data})  # type: ignore[attr-defined]


class Version(NamedTuple):
    version: str
    bundle: str
    python: str


class ConfigChange(NamedTuple):
    """One master option setup changed in master.toml, its values as TOML shows them
    ("unset" for none)."""

    key: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


class SetupResult(NamedTuple):
    root: str
    dirs: list[str]
    created: list[str] = []  # directories this call made
    installed: bool = False  # the zipapp on disk changed
    config_changed: bool = False  # master.toml changed
    config_changes: list[ConfigChange] = []  # each master option it changed

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SetupResult:
        data = dict(data)
        data["config_changes"] = [ConfigChange(*c) for c in data.get("config_changes", [])]
        return _load(cls, data)


class ReleaseInfo(NamedTuple):
    name: str
    revision: str | None


class MasterState(NamedTuple):
    running: bool
    pid: int | None = None
    socket: str | None = None
    stopped: bool = False  # `deployer app stop` keeps it down (layout.stopped)


class Lifecycle(NamedTuple):
    """agent op `lifecycle`: the stop mark set or cleared, or a role's files removed."""

    action: str  # "stop" | "start" | "remove"
    changed: bool
    removed: list[str] = []  # paths removed (remove)


class HostState(NamedTuple):
    root: str
    exists: bool
    current: str | None
    current_revision: str | None
    previous: str | None
    releases: list[ReleaseInfo]
    have: list[str]  # commits the host's object cache holds
    master: MasterState
    bundle: str | None = None  # the agent's bundle id: checked in the same call
    cpus: int | None = None  # what workers = "auto" means there
    # the master of every role whose toml is on the host ("": master.toml, no [roles])
    masters: dict[str, MasterState] = {}
    # the release each role was last switched to (layout.role_releases)
    role_releases: dict[str, str] = {}

    def release_of(self, role: str | None) -> str | None:
        """What `role`'s workers should run: the release it was last switched to."""
        return self.role_releases.get(role or "") or self.current

    @property
    def release_names(self) -> list[str]:
        return [r.name for r in self.releases]

    def master_of(self, role: str | None) -> MasterState:
        """`role`'s master (None: the implicit one); not running without its toml."""
        found = self.masters.get(role or "")
        if found is not None:
            return found
        return self.master if role is None else MasterState(running=False)

    def to_json(self) -> dict[str, Any]:
        out = self._asdict()
        out["releases"] = [r._asdict() for r in self.releases]
        out["master"] = self.master._asdict()
        out["masters"] = {r: m._asdict() for r, m in self.masters.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostState:
        data = dict(data)
        data["releases"] = [_load(ReleaseInfo, r) for r in data.get("releases", [])]
        data["master"] = _load(MasterState, data.get("master") or {"running": False})
        masters = data.get("masters") or {}
        data["masters"] = {r: _load(MasterState, m) for r, m in masters.items()}
        return _load(cls, data)


class MasterSummary(NamedTuple):
    """What a host's master says of itself, for `deployer status`."""

    pid: int
    state: str  # running | reloading | degraded | starting | stopping
    release: str | None  # the release its workers run (a directory name)
    ready: int
    configured: int
    recent_crashes: int  # within the status window
    last_crash: str | None  # when (ISO) and how
    crash_loops: int  # slots crashing in a row, their restarts backed off


class BootStatus(NamedTuple):
    """Would the master come back after a reboot: the unit `deployer setup` installed
    (agent op `unit`), as the host has it now."""

    supervisor: str | None  # as setup last applied it; None: setup never installed a unit
    unit: str | None = None  # deployer-<app>-<hash>.service
    scope: str | None = None  # "system" | "user"
    path: str | None = None  # the unit file
    enabled: bool = False  # the unit file is there and enabled
    linger: bool | None = None  # user units: the user's systemd starts at boot
    systemd_running: bool = False  # the host was booted with systemd
    comes_back: bool = False
    why: str = ""  # one line: how it comes back, or why it does not


class UnitResult(NamedTuple):
    """Agent op `unit` (deployer setup): the app's systemd unit on this host."""

    supervisor: str
    unit: str | None = None
    scope: str | None = None
    path: str | None = None
    written: bool = False  # the unit file was created or changed
    removed: bool = False  # supervisor = "none": a unit setup installed before was removed
    enabled: bool = False  # enabled now
    enabled_now: bool = False  # this call enabled it
    systemd_running: bool = False
    linger: bool | None = None
    started: str | None = None  # systemd running: how the unit started (or None)
    notes: list[str] = []  # what could not be done, one line each
    boot: str = ""  # one line: will the master come back after a reboot


class HostStatus(NamedTuple):
    state: HostState
    master: MasterSummary | None  # None: no master running, or it did not answer
    master_error: str | None  # why it did not answer
    lock: LockOwner | None  # who holds the host's deploy lock
    health: str | None  # None: not probed; "ok"; else why it failed
    boot: BootStatus | None = None  # None: not asked (a host without a [master])

    def to_json(self) -> dict[str, Any]:
        out = self._asdict()
        out["state"] = self.state.to_json()
        out["master"] = None if self.master is None else self.master._asdict()
        out["lock"] = None if self.lock is None else self.lock._asdict()
        out["boot"] = None if self.boot is None else self.boot._asdict()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostStatus:
        data = dict(data)
        data["state"] = HostState.from_json(data["state"])
        data["master"] = (
            None if data.get("master") is None else _load(MasterSummary, data["master"])
        )
        data["lock"] = LockOwner.from_json(data.get("lock"))
        data["boot"] = None if data.get("boot") is None else _load(BootStatus, data["boot"])
        return _load(cls, data)


class PrepareResult(NamedTuple):
    release: str
    path: str
    build_seconds: float
    bytes: int = 0  # of the pack received in the same call
    pack: str = ""


class SwitchResult(NamedTuple):
    previous: str | None
    current: str
    # each switched role's master as the flip left it ("": the implicit role): the
    # reload that follows needs no state call of its own
    masters: dict[str, MasterState] = {}

    def master_of(self, role: str | None) -> MasterState:
        return self.masters.get(role or "") or MasterState(running=False)

    def to_json(self) -> dict[str, Any]:
        out = self._asdict()
        out["masters"] = {r: m._asdict() for r, m in self.masters.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SwitchResult:
        data = dict(data)
        data["masters"] = {r: _load(MasterState, m) for r, m in (data.get("masters") or {}).items()}
        return _load(cls, data)


class PruneResult(NamedTuple):
    removed: list[str]
    kept: list[str]


class HealthResult(NamedTuple):
    url: str
    probes: int
    status: int


class WatchResult(NamedTuple):
    seconds: float
    polls: int  # master status reads
    probes: int  # health probes


class WorkerReport(NamedTuple):
    """Agent op `workers`: what a master saw of one release's workers, for a failure
    that needs its cause (a health check nobody answered)."""

    release: str  # the release's directory name
    listen: str | None  # the master's listening socket (None: it has none)
    ready: int  # the release's workers ready now
    configured: int
    crashes: int  # the release's worker crashes in the master's crash log
    last_crash: str | None = None  # how the last one ended
    lines: list[str] = []  # the last lines they wrote, each "[worker N pid P] text"


class Secrets(NamedTuple):
    """The names of the secrets a host holds (never their values)."""

    keys: list[str]
    changed: bool = False


class Recorded(NamedTuple):
    recorded: bool = True


class LockOwner(NamedTuple):
    """Who holds a deploy lock; `heartbeat` (epoch seconds) is read from the file."""

    id: str
    app: str = ""
    revision: str = ""
    action: str = "rollout"
    user: str = ""
    controller: str = ""
    pid: int | None = None
    since: str = ""
    heartbeat: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = self._asdict()
        out.pop("heartbeat")
        return out

    @classmethod
    def from_json(cls, data: Any) -> LockOwner | None:
        """None for no holder; a holder of unknown identity for a corrupt owner file."""
        if data is None:
            return None
        fields = (
            {k: v for k, v in data.items() if k in cls._fields} if isinstance(data, dict) else {}
        )
        fields["id"] = str(fields.get("id") or "")
        return cls(**fields)


class LockAnswer(NamedTuple):
    """acquire: done=acquired; heartbeat: done=still ours; release: done=released;
    show: done=False. `holder` is who held it (None: nobody)."""

    done: bool
    holder: LockOwner | None = None

    def to_json(self) -> dict[str, Any]:
        return {"done": self.done, "holder": None if self.holder is None else self.holder._asdict()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LockAnswer:
        return cls(bool(data.get("done")), LockOwner.from_json(data.get("holder")))


class MigrationRow(NamedTuple):
    """One migration as `migrate status --json` reports it (event "migration")."""

    name: str
    phase: str | None = None
    state: str = "pending"  # applied | partial | pending | changed | missing
    release: str | None = None

    @property
    def applied(self) -> bool:
        """In the database: "missing"/"changed" too (applied, by a release whose files
        are not the ones read now)."""
        return self.state in ("applied", "missing", "changed")


def migration_rows(stdout: str) -> list[MigrationRow]:
    """The migration rows of a `migrate ... --json` output; other lines are skipped."""
    rows = []
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "migration" and "name" in event:
            rows.append(_load(MigrationRow, event))
    return rows


# --- the result line ------------------------------------------------------------------


def to_json(answer: tuple) -> dict[str, Any]:
    custom = getattr(answer, "to_json", None)
    return custom() if custom is not None else answer._asdict()  # type: ignore[attr-defined]


def result_line(
    answer: tuple | None = None, error: str | None = None, code: int = EXIT_FAILED
) -> str:
    """`code`: the exit code the failure stands for (EXIT_BAD_INPUT: a refusal)."""
    if error is not None:
        body = {"ok": False, "error": error, "code": code}
    else:
        body = {"ok": True, **to_json(answer)}
    return f"{RESULT_MARK} {json.dumps(body)}"


class AgentFailed(Exception):
    """The agent answered ok=false; the message is its error, `code` its exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def parse_result(stdout: str, answer: type[T]) -> T | None:
    """The record in the last result line of `stdout`; None if there is none.
    Raises AgentFailed for an ok=false answer, ValueError for a garbled one."""
    for line in reversed(stdout.splitlines()):
        if not line.startswith(RESULT_MARK):
            continue
        body = json.loads(line[len(RESULT_MARK) :])
        if not isinstance(body, dict):
            raise ValueError(f"result is not a JSON object: {line[:200]!r}")
        if not body.get("ok"):
            code = body.get("code")
            code = code if code in (EXIT_FAILED, EXIT_BAD_INPUT) else EXIT_FAILED
            raise AgentFailed(str(body.get("error") or "unknown error"), code)
        body.pop("ok")
        loader = getattr(answer, "from_json", None)
        try:
            return loader(body) if loader is not None else _load(answer, body)
        except TypeError as e:  # a field missing: an agent of another version
            raise ValueError(f"unexpected answer {body!r}: {e}") from None
    return None


# --- day-2 ------------------------------------------------------------------------------


class LogsResult(NamedTuple):
    """`agent logs`: the lines themselves were streamed before this answer."""

    path: str
    exists: bool  # the log was there (when the op ended)
    lines: int  # lines streamed
    reopened: int = 0  # follow: times the log was moved away and a new one followed


class ExecResult(NamedTuple):
    """`agent exec` never answers when the command runs (it replaces the agent):
    only its refusals are result lines."""

    exit_code: int = 0


# The parts of a Probe. Each carries `error` instead when it could not be learnt.


class ProbeUser(NamedTuple):
    name: str = "?"
    uid: int | None = None
    error: str | None = None


class ProbeDisk(NamedTuple):
    path: str = ""  # deploy_to, or its nearest existing parent
    free: int = 0  # bytes
    total: int = 0
    error: str | None = None


class ProbeLayout(NamedTuple):
    state: str | None = None  # ok | missing | incomplete | untrusted | not-writable
    why: str | None = None  # untrusted: what is wrong
    parent: str | None = None  # missing: where deploy_to would be made
    writable: bool = False  # missing: can the user make it there
    dirs: list[str] = []  # not-writable: those
    missing: list[str] = []  # incomplete: those
    error: str | None = None


class ProbeAgent(NamedTuple):
    state: str | None = None  # same | differs | missing
    path: str | None = None
    error: str | None = None


class ProbeToml(NamedTuple):
    exists: bool = False
    path: str | None = None
    text: str | None = None  # read only from a layout the agent trusts
    error: str | None = None


class ProbeMaster(NamedTuple):
    pid: int | None = None  # None: no master runs
    error: str | None = None


class ProbeSystemd(NamedTuple):
    running: bool = False  # booted with systemd
    systemctl: str | None = None
    error: str | None = None


class ProbeListen(NamedTuple):
    state: str | None = None  # free | ours | taken | unchecked | error
    pid: int | None = None  # ours: the master's; taken: the holder's, if known
    why: str | None = None
    error: str | None = None


_PROBE_PARTS: dict[str, type] = {
    "user": ProbeUser,
    "disk": ProbeDisk,
    "layout": ProbeLayout,
    "agent": ProbeAgent,
    "master_toml": ProbeToml,
    "master": ProbeMaster,
    "systemd": ProbeSystemd,
    "listen": ProbeListen,
}


class Probe(NamedTuple):
    """hostapi/probe.py: what `deployer doctor` and `config --diff` learn of a host
    without its agent (the probe itself writes plain JSON objects)."""

    python: str  # version, e.g. "3.11.7"
    executable: str
    time: float  # the host's clock (epoch seconds)
    user: ProbeUser = ProbeUser()
    disk: ProbeDisk = ProbeDisk()
    layout: ProbeLayout = ProbeLayout()
    agent: ProbeAgent = ProbeAgent()
    master_toml: ProbeToml = ProbeToml()
    master: ProbeMaster = ProbeMaster()
    systemd: ProbeSystemd = ProbeSystemd()
    listen: ProbeListen = ProbeListen()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Probe:
        data = dict(data)
        for key, part in _PROBE_PARTS.items():
            value = data.get(key)
            data[key] = _load(part, value) if isinstance(value, dict) else part()
        return _load(cls, data)


# --- the agent session: many calls over one process (agent session) ----------------------
#
# Request (controller -> agent, on the session's stdin): one JSON line
#     {"id": 7, "argv": ["state", "--root", "/srv/app"], "stdin": 1234}
# then exactly `stdin` raw bytes (the call's stdin: a pack, a secret value; 0: none).
# Answer (agent -> controller, on stdout): what the op streams (plain lines), its
# result line (RESULT_MARK ...), then the end frame `END_MARK 7`: the call is over.
# Requests are answered in order, one at a time; pipelining is allowed.

END_MARK = "@@deployer-end"
MAX_REQUEST_LINE = 1 << 20


def request_frame(request_id: int, argv: list[str], stdin: bytes = b"") -> bytes:
    head = json.dumps({"id": request_id, "argv": list(argv), "stdin": len(stdin)})
    return head.encode() + b"\n" + stdin


def parse_request(line: bytes) -> tuple[int, list[str], int]:
    """(id, argv, stdin length) of a request line; ValueError for a garbled one."""
    body = json.loads(line)
    if not isinstance(body, dict):
        raise ValueError("request is not a JSON object")
    rid, argv, size = body.get("id"), body.get("argv"), body.get("stdin", 0)
    if not isinstance(rid, int) or not isinstance(size, int) or size < 0:
        raise ValueError(f"bad request header {line[:200]!r}")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ValueError(f"bad request argv {line[:200]!r}")
    return rid, argv, size


def end_frame(request_id: int) -> str:
    return f"{END_MARK} {request_id}"


def end_id(line: str) -> int | None:
    """The request id an end frame closes; None for any other line."""
    if not line.startswith(END_MARK + " "):
        return None
    try:
        return int(line[len(END_MARK) + 1 :].strip())
    except ValueError:
        return None
