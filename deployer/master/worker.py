"""A worker: its record in the master, and how it is started.

Every worker gets the listening socket as fd 3 with LISTEN_FDS=1 and
LISTEN_PID=<its own pid> (the systemd socket-activation convention; with
listen_fds N, N copies of the one socket as fds 3..N+2); a master without a
listening socket (queue consumers) gives none: no fd 3, no LISTEN_*. It runs in
its own process group (signals go to the group, so `npm start` wrappers leave
nothing behind), and dies with the master (PR_SET_PDEATHSIG).

We fork and exec ourselves instead of using subprocess: only the child knows
its pid before exec (LISTEN_PID), and the master is single-threaded, so the
code between fork and exec is safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from deployer.hostapi.workerenv import MASTER_SETS
from deployer.master.log import new_tail
from deployer.master.readiness import READY_FD_ENV, ReadyPipe

LISTEN_FD = 3
PR_SET_PDEATHSIG = 1
EXEC_FAILED = 127
# Signals the master catches; a child must not keep our handlers between
# fork and exec (a stop signal arriving then would be swallowed).
CAUGHT_SIGNALS = (
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
# Variables that belong to the master's own supervisor, never to a worker.
MASTER_ONLY_ENV = (*MASTER_SETS, READY_FD_ENV)

_libc: ctypes.CDLL | None = None


def _prctl() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


@dataclass(frozen=True)
class Spec:
    """What a worker runs: the release directory (cwd resolved at spawn time)
    and the generation (bumped by every reload; a failed reload goes back)."""

    release: str
    generation: int


@dataclass
class Worker:
    id: int
    pid: int
    spec: Spec
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    state: str = "starting"  # starting | ready | draining
    ready_at: float | None = None
    kill_at: float | None = None  # when draining: SIGKILL the group at this time
    ready_pipe: ReadyPipe | None = None
    stderr_tail: deque[str] = field(default_factory=deque)
    status_text: str = ""  # last STATUS= it sent
    killed_for: str | None = None  # why the master killed it (reported instead of "SIGKILL")
    stream_fds: list[int] = field(default_factory=list)  # read ends of its stdout/stderr

    @property
    def label(self) -> str:
        return f"worker {self.id} pid {self.pid}"

    def uptime(self, now: float) -> float:
        return now - self.started_mono

    def signal(self, sig: int) -> None:
        """Signal the worker's whole process group (its pgid is its pid)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def rss_bytes(self) -> int | None:
        return rss_bytes(self.pid)

    def last_stderr(self) -> str:
        return "\n".join(self.stderr_tail)

    def to_state(self) -> dict[str, Any]:
        """The record as JSON (an upgrade hands it over); fds by number."""
        return {
            "id": self.id,
            "pid": self.pid,
            "release": self.spec.release,
            "generation": self.spec.generation,
            "started_at": self.started_at,
            "started_mono": self.started_mono,
            "state": self.state,
            "ready_at": self.ready_at,
            "kill_at": self.kill_at,
            "status_text": self.status_text,
            "ready_fd": None if self.ready_pipe is None else self.ready_pipe.fd,
            "stderr_tail": list(self.stderr_tail),
            "killed_for": self.killed_for,
            "stream_fds": self.stream_fds,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Worker:
        w = cls(
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
            stderr_tail=new_tail(),
        )
        w.stderr_tail.extend(d["stderr_tail"])
        if d["ready_fd"] is not None:
            w.ready_pipe = ReadyPipe(d["ready_fd"])
        return w


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXEC_FAILED:
        return f"exited with code {code} (command not found or not executable?)"
    return f"exited with code {code}"


@dataclass
class Launch:
    """Everything needed to start one worker process."""

    command: list[str]
    cwd: str | None
    env: dict[str, str]
    listener_fd: int | None  # None: a master without a listening socket
    stdout_fd: int
    stderr_fd: int
    ready_fd: int | None = None  # pipe mode: write end, placed at ready_fd_number()
    listen_fds: int = 1  # 0 without a listening socket


def fd_count(listener_fd: int | None, listen_fds: int) -> int:
    """How many copies of the listening socket a worker gets (none without one)."""
    return 0 if listener_fd is None else listen_fds


def ready_fd_number(listen_fds: int) -> int:
    """Where the pipe-readiness fd goes: right after the listening fds (fd 3
    when there are none)."""
    return LISTEN_FD + listen_fds


def worker_env(base: dict[str, str], extra: dict[str, str], listen_fds: int = 1) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in MASTER_ONLY_ENV}
    env.update(extra)
    if listen_fds > 0:  # none: no socket, so no socket-activation variables at all
        env["LISTEN_FDS"] = str(listen_fds)
        env["LISTEN_FDNAMES"] = ":".join(["listen"] * listen_fds)
    return env


def start_process(launch: Launch) -> int:
    """fork + exec; returns the child's pid (also its process group id)."""
    libc = _prctl()
    master = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child until exec
        _become_worker(launch, master, libc)
    # Also set the group from the parent, so killpg works even before the child ran.
    with contextlib.suppress(PermissionError, ProcessLookupError):
        os.setpgid(pid, pid)
    return pid


def _become_worker(launch: Launch, master: int, libc: ctypes.CDLL) -> None:  # pragma: no cover
    try:
        signal.set_wakeup_fd(-1)
        for sig in (*CAUGHT_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setpgid(0, 0)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != master:  # the master died before prctl took effect
            os._exit(1)
        _install_fds(launch)
        if launch.cwd:
            os.chdir(launch.cwd)
        env = dict(launch.env)
        if fd_count(launch.listener_fd, launch.listen_fds) > 0:
            env["LISTEN_PID"] = str(os.getpid())
        os.execvpe(launch.command[0], launch.command, env)
    except BaseException as e:  # noqa: BLE001 - report anything, then exit
        with contextlib.suppress(OSError):
            os.write(2, f"deployer master: cannot run {launch.command[0]!r}: {e}\n".encode())
    os._exit(EXEC_FAILED)


def _install_fds(launch: Launch) -> None:  # pragma: no cover - child only
    """Put each inherited fd at its fixed number. Copies go above every target
    first so a source that already sits on a target number is not clobbered."""
    wanted = {1: launch.stdout_fd, 2: launch.stderr_fd}
    copies = fd_count(launch.listener_fd, launch.listen_fds)
    if launch.listener_fd is not None:
        for i in range(copies):
            wanted[LISTEN_FD + i] = launch.listener_fd
    if launch.ready_fd is not None:
        wanted[ready_fd_number(copies)] = launch.ready_fd
    floor = max(10, max(wanted) + 1)
    # One high copy per source: the listener's N targets share it.
    high = {src: fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, floor) for src in set(wanted.values())}
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for target, src in wanted.items():
        os.dup2(high[src], target)  # dup2 makes the target inheritable
    if LISTEN_FD not in wanted:  # no socket: no fd 3 either, whatever the master inherited there
        with contextlib.suppress(OSError):
            os.close(LISTEN_FD)
