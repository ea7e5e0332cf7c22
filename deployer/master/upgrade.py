"""Self-upgrade: the master re-execs itself in place (einhorn style).

Same pid, so systemd's MAINPID, the pidfile and the workers' parent stay the
same; the listening socket, the workers, their pipes, the control socket and
its clients (the one that asked gets its answer from the new master) are all
kept. The state goes to the new master as JSON in a memfd it inherits.

1. preflight: the new code runs `_resume --check` on the state (import,
   parse, adopt as a dry run); any failure and nothing else happens.
2. signals are blocked (they stay pending across exec, nothing can kill us
   by default action in between), the fds are made inheritable, exec.
3. the new master adopts the state. If it cannot, it execs the previous code
   with the same state, which adopts it and reports the failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import deployer
from deployer.master.config import MasterConfig, Readiness
from deployer.master.control import Connection, ControlServer
from deployer.master.guard import Guard
from deployer.master.log import MasterLog, OutputStream, new_tail
from deployer.master.readiness import NotifySocket, ReadyPipe, SystemdNotifier
from deployer.master.worker import CAUGHT_SIGNALS, Spec, Worker

if TYPE_CHECKING:
    from deployer.master.arbiter import Arbiter

STATE_VERSION = 1
CHECK_TIMEOUT = 30.0


class AdoptError(Exception):
    """The state cannot be adopted by this code."""


def code_root() -> str:
    """Directory (or zipapp) that holds the `deployer` package we run from."""
    return os.path.dirname(os.path.dirname(os.path.abspath(deployer.__file__)))


# --- the old master ---


def snapshot(arb: Arbiter, requester: Connection, code: str, simulate_failure: bool) -> dict:
    now = time.monotonic()  # CLOCK_MONOTONIC is system-wide: deadlines stay valid
    return {
        "version": STATE_VERSION,
        "config": asdict(arb.cfg),
        "fds": {
            "listener": arb.listener.fileno(),
            "notify": None if arb.notify is None else arb.notify.fileno(),
            "control": None if arb.control is None else arb.control.fileno(),
            "guard": arb.guard.fd,
        },
        "guard_pid": arb.guard.pid,
        "systemd": arb.systemd.address,
        "log": {"path": arb.log.path, "stderr_captured": arb.log.stderr_captured},
        "pinned": [arb.pinned.release, arb.pinned.generation],
        "generation": arb.generation,
        "target": arb.target,
        "slots": [
            {
                "id": s.id,
                "restarts": s.restarts,
                "crash_streak": s.crash_streak,
                "respawn_at": s.respawn_at,
                "worker": s.worker.pid if s.worker else None,
            }
            for s in arb.slots.values()
        ],
        "workers": [worker_state(w) for w in arb.workers.values()],
        "streams": [
            {
                "fd": fd,
                "who": s.who,
                "partial": s.partial.decode(errors="replace"),
                "stderr_of": next(
                    (w.pid for w in arb.workers.values() if s.tail is w.stderr_tail), None
                ),
            }
            for fd, s in arb.streams.items()
        ],
        "lingering": {str(k): v for k, v in arb.lingering.items()},
        "conns": [
            {
                "fd": fd,
                "inbuf": c.inbuf.decode(errors="replace"),
                "outbuf": c.outbuf.decode(errors="replace"),
                "requester": c is requester,
            }
            for fd, c in arb.conns.items()
            if not c.closed
        ],
        "counts": arb.counts,
        "last_reload": arb.last_reload,
        "job_ids": arb.job_ids,
        "announced": arb.announced,
        "started": arb.started,
        "base_cwd": arb.base_cwd,
        "upgrades": arb.upgrades,
        "backlog": arb.backlog,
        "code": {"previous": code_root(), "next": code},
        "pythonpath": os.environ.get("PYTHONPATH"),
        "simulate_adopt_failure": simulate_failure,
        "adopt_error": None,
        "saved_at": now,
    }


def worker_state(w: Worker) -> dict[str, Any]:
    return {
        "id": w.id,
        "pid": w.pid,
        "release": w.spec.release,
        "generation": w.spec.generation,
        "started_at": w.started_at,
        "started_mono": w.started_mono,
        "state": w.state,
        "ready_at": w.ready_at,
        "kill_at": w.kill_at,
        "status_text": w.status_text,
        "ready_fd": None if w.ready_pipe is None else w.ready_pipe.fd,
        "stderr_tail": list(w.stderr_tail),
        "killed_for": w.killed_for,
        "stream_fds": w.stream_fds,
    }


def state_fds(state: dict) -> list[int]:
    fds = [fd for fd in state["fds"].values() if fd is not None]
    fds += [s["fd"] for s in state["streams"]]
    fds += [w["ready_fd"] for w in state["workers"] if w["ready_fd"] is not None]
    fds += [c["fd"] for c in state["conns"]]
    return fds


def preflight(state: dict, code: str) -> str | None:
    """Run the new code's adoption check on the state; None if it passes."""
    env = dict(os.environ, PYTHONPATH=pythonpath(code, state["pythonpath"]))
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-P",
                "-m",
                "deployer.master",
                "_resume",
                "--check",
                "--state-fd",
                "0",
            ],
            input=json.dumps(state),
            capture_output=True,
            text=True,
            env=env,
            timeout=CHECK_TIMEOUT,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the check did not run: {e}"
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return f"exit {r.returncode}: " + " | ".join(lines[-5:])
    return None


# `-P`: the master's cwd is not put on sys.path, so `code` (first on PYTHONPATH)
# is what gets imported even if the cwd holds another deployer package.


def pythonpath(code: str, original: str | None) -> str:
    return code if not original else f"{code}{os.pathsep}{original}"


def reexec(state: dict, code: str) -> OSError:
    """exec the master on `code` with `state`; returns only if exec failed."""
    signal.pthread_sigmask(signal.SIG_BLOCK, CAUGHT_SIGNALS)
    fds = state_fds(state)
    for fd in fds:
        os.set_inheritable(fd, True)
    memfd = os.memfd_create("deployer-master-state", 0)
    os.write(memfd, json.dumps(state).encode())
    os.lseek(memfd, 0, os.SEEK_SET)
    os.set_inheritable(memfd, True)
    env = dict(os.environ, PYTHONPATH=pythonpath(code, state["pythonpath"]))
    argv = [sys.executable, "-P", "-m", "deployer.master", "_resume", "--state-fd", str(memfd)]
    signal.set_wakeup_fd(-1)
    try:
        os.execve(sys.executable, argv, env)
    except OSError as e:
        os.close(memfd)
        for fd in fds:
            os.set_inheritable(fd, False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT_SIGNALS)
        return e
    raise AssertionError("unreachable")  # pragma: no cover


# --- the new master ---


def read_state(fd: int) -> dict:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    if fd > 2:
        os.close(fd)
    return json.loads(b"".join(chunks))


def config_from_state(data: dict[str, Any]) -> MasterConfig:
    data = dict(data)
    data["ready"] = Readiness(**data["ready"])
    return MasterConfig(**data)


def restore(state: dict, dry_run: bool = False) -> Arbiter:
    """Build the arbiter from a snapshot; dry_run touches no fd (preflight).

    Everything that can fail is done before the first inherited fd is wrapped,
    so a failure leaves the fds as they were for the exec back.
    """
    from deployer.master.arbiter import Arbiter, Slot

    if state.get("version") != STATE_VERSION:
        raise AdoptError(f"state version {state.get('version')} (this code reads {STATE_VERSION})")
    if state["simulate_adopt_failure"] and not dry_run and state["adopt_error"] is None:
        raise AdoptError("simulated adoption failure (requested for a test)")
    cfg = config_from_state(state["config"])
    workers = {w.pid: w for w in map(restore_worker, state["workers"])}
    slots = {}
    for s in state["slots"]:
        slot = Slot(
            s["id"],
            restarts=s["restarts"],
            crash_streak=s["crash_streak"],
            respawn_at=s["respawn_at"],
        )
        slot.worker = workers[s["worker"]] if s["worker"] else None
        slots[slot.id] = slot
    lingering = {int(k): float(v) for k, v in state["lingering"].items()}
    pinned = Spec(*state["pinned"])
    fds = state["fds"]
    if dry_run:
        arb = Arbiter(
            cfg, MasterLog(None), socket.socket(), None, notify=None, systemd=SystemdNotifier(None)
        )
        arb.listener.close()
    else:
        log = MasterLog(state["log"]["path"])
        if state["log"]["stderr_captured"]:
            log.capture_stderr()
        control = None
        if fds["control"] is not None:
            control = ControlServer(cfg.socket or "", socket.socket(fileno=fds["control"]))
        notify = None
        if fds["notify"] is not None:
            notify = NotifySocket(socket.socket(fileno=fds["notify"]))
        arb = Arbiter(
            cfg,
            log,
            socket.socket(fileno=fds["listener"]),
            control,
            notify=notify,
            systemd=SystemdNotifier(state["systemd"]),
        )
    arb.guard = Guard(state["guard_pid"], None if dry_run else fds["guard"])
    arb.pinned = pinned
    arb.generation = state["generation"]
    arb.target = state["target"]
    keys = ("counts", "last_reload", "job_ids", "announced", "started", "base_cwd", "upgrades")
    for key in (*keys, "backlog"):
        setattr(arb, key, state[key])
    arb.lingering = lingering
    arb.workers = workers
    arb.slots = slots
    if dry_run:
        return arb
    for s in state["streams"]:
        owner = workers.get(s["stderr_of"]) if s["stderr_of"] else None
        stream = OutputStream(s["fd"], s["who"], arb.log, owner.stderr_tail if owner else None)
        stream.partial = s["partial"].encode()
        arb.streams[s["fd"]] = stream
    for c in state["conns"]:
        conn = Connection(socket.socket(fileno=c["fd"]))
        conn.inbuf, conn.outbuf = c["inbuf"].encode(), c["outbuf"].encode()
        arb.conns[c["fd"]] = conn
        if c["requester"]:
            arb.upgrade_requester = conn
    for fd in state_fds(state):
        os.set_inheritable(fd, False)
    if state["pythonpath"] is None:
        os.environ.pop("PYTHONPATH", None)  # ours, for the exec; workers must not see it
    else:
        os.environ["PYTHONPATH"] = state["pythonpath"]
    return arb


def restore_worker(d: dict) -> Worker:
    w = Worker(
        id=d["id"],
        pid=d["pid"],
        spec=Spec(d["release"], d["generation"]),
        started_at=d["started_at"],
        started_mono=d["started_mono"],
        state=d["state"],
        ready_at=d["ready_at"],
        kill_at=d["kill_at"],
        status_text=d["status_text"],
        killed_for=d["killed_for"],
        stream_fds=d["stream_fds"],
    )
    w.stderr_tail = new_tail()
    w.stderr_tail.extend(d["stderr_tail"])
    if d["ready_fd"] is not None:
        w.ready_pipe = ReadyPipe(d["ready_fd"])
    return w


def exec_back(state: dict, error: str) -> None:
    """The new code could not adopt the state: go back to the previous code."""
    state["adopt_error"] = error
    code = state["code"]["previous"]
    state["code"] = {"previous": code, "next": code}
    e = reexec(state, code)
    raise SystemExit(f"deployer master: cannot exec back to {code}: {e}")


def resume(fd: int, check: bool) -> int:
    """`_resume`: the entry point of a re-exec'd master (and of the preflight)."""
    state = read_state(fd)
    if check:
        restore(state, dry_run=True)
        return 0
    try:
        arb = restore(state)
    except Exception as e:  # noqa: BLE001 - any failure to adopt means: go back
        if state["adopt_error"] is not None:
            raise  # already the fallback: nothing further to go back to
        exec_back(state, f"{type(e).__name__}: {e}")
        return 1  # pragma: no cover
    from deployer.master import daemon

    try:
        return arb.run(resumed=state)
    finally:
        daemon.remove_pidfile(arb.cfg.pidfile)
