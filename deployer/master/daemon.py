"""Serving: bind (nothing without `listen`: queue consumers), open the control
socket, write the pidfile, optionally detach (`start`), then run the arbiter
until it stops.

Everything that can be bad input (busy port, a live master on the socket or
pidfile) is checked before detaching, so `start` reports it with exit 2.
`start` returns only once every worker is ready (exit 0) or a first worker
failed to boot (exit 1, with the reason and the worker's last stderr lines).
`run` where a master already answers on the socket takes it over without a
failed request (handover.py): how the systemd unit replaces a daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import sys

from deployer.master import handover, listener
from deployer.master.arbiter import Arbiter
from deployer.master.config import ConfigError, MasterConfig
from deployer.master.control import ControlServer
from deployer.master.log import MasterLog

START_GRACE = 30.0  # `start` waits ready_timeout plus this for the daemon's verdict


def serve(cfg: MasterConfig, detach: bool) -> int:
    activated = os.environ.get("LISTEN_PID") == str(os.getpid())  # systemd gave a socket
    if not detach and not activated and handover.wanted(cfg):
        return take_over(cfg)  # `run` where a master runs: the unit taking over a daemon
    sock = open_listener(cfg)
    try:
        if cfg.nonblocking and sock is not None:
            sock.setblocking(False)  # on the open file: every worker's copy is non-blocking
        ctl = ControlServer(cfg.socket) if cfg.socket else None
    except BaseException:
        close_listener(sock)
        raise
    try:
        check_pidfile(cfg.pidfile)
        if detach and not cfg.log:
            cfg = dataclasses.replace(cfg, log=default_daemon_log(cfg))  # cfg may be frozen
        log = open_log(cfg.log)
    except BaseException:
        close_listener(sock)
        if ctl is not None:
            ctl.close()
        raise
    if not detach:
        return run_arbiter(cfg, log, sock, ctl, announce=None)
    verdict_r, verdict_w = os.pipe()
    if os.fork() > 0:
        os.close(verdict_w)
        # The daemon owns these now; closing our copies (not unlinking) keeps
        # this process from holding the port if it lives on.
        close_listener(sock)
        if ctl is not None:
            ctl.sock.close()
        return await_verdict(verdict_r, cfg.ready_timeout + START_GRACE)
    os.close(verdict_r)
    detach_from_terminal(log)
    code = 1
    try:
        code = run_arbiter(cfg, log, sock, ctl, announce=verdict_writer(verdict_w))
    finally:
        os._exit(code)


def take_over(cfg: MasterConfig) -> int:
    """`run` on the socket of a running master: take its listening socket, start our
    workers, and once they are ready take its place (see handover.py). From a
    master without a listening socket we get none: we bind our `listen`, if any."""
    h = handover.Handover(cfg, write_pid=lambda: write_pidfile(cfg.pidfile))
    sock = h.request()
    try:
        if sock is None and cfg.listen:
            sock = listener.bind(cfg.listen)  # a bad one: bad input, the old master goes on
        if cfg.nonblocking and sock is not None:
            sock.setblocking(False)
        ctl = ControlServer(h.control_path)
        try:
            log = open_log(cfg.log)
        except BaseException:
            ctl.close()
            raise
    except BaseException as e:
        close_listener(sock)
        h.abort(str(e))
        raise
    log.master(
        f"taking over from master pid {h.old_pid} on {cfg.socket} (its release {h.old_release})"
    )
    got = None if sock is None else listener.describe(sock)
    if sock is not None and cfg.listen and cfg.listen != got:
        log.master(f"listen is {cfg.listen} here, the socket taken over {got}: a restart moves it")
    elif sock is not None and not cfg.listen:
        log.master(f"no listen here, the socket taken over {got}: a restart closes it")
    return run_arbiter(cfg, log, sock, ctl, announce=h.announce, handover=h)


def open_log(path: str | None) -> MasterLog:
    try:
        return MasterLog(path)
    except OSError as e:
        why = (
            "a symlink; the log is never written through one"
            if e.errno == errno.ELOOP
            else (e.strerror)
        )
        raise ConfigError(f"--log: cannot open {path}: {why}") from None


def open_listener(cfg: MasterConfig) -> socket.socket | None:
    """The socket systemd passed, else `listen` bound; None without either: the
    workers (queue consumers) get no socket."""
    inherited = listener.inherited()
    if inherited is not None:
        return inherited
    if not cfg.listen:
        return None
    return listener.bind(cfg.listen)


def close_listener(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


def run_arbiter(cfg, log, sock, ctl, announce, handover=None) -> int:
    if handover is None:
        write_pidfile(cfg.pidfile)  # a handover writes it once it has taken over
    try:
        systemd = None if handover is None else handover.notifier()
        arbiter = Arbiter(cfg, log, sock, ctl, announce=announce, systemd=systemd)
        if handover is not None:
            handover.arbiter = arbiter
        return arbiter.run()
    finally:
        remove_pidfile(cfg.pidfile)


def default_daemon_log(cfg: MasterConfig) -> str:
    for anchor in (cfg.socket, cfg.pidfile):
        if anchor:
            return os.path.join(os.path.dirname(anchor), "master.log")
    raise ConfigError("--log: start needs a log file (a daemon has no terminal)")


# --- detaching ---


def detach_from_terminal(log: MasterLog) -> None:
    """Double fork + setsid; stdio to /dev/null, our stderr into the log."""
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    log.capture_stderr()


def verdict_writer(fd: int):
    def announce(ok: bool, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(fd, f"{'ok' if ok else 'error'} {os.getpid()} {text}".encode())
        with contextlib.suppress(OSError):
            os.close(fd)

    return announce


def await_verdict(fd: int, timeout: float) -> int:
    import select

    data = b""
    ready, _, _ = select.select([fd], [], [], timeout)
    while ready:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        ready, _, _ = select.select([fd], [], [], 1.0)
    os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(-1, 0)  # the intermediate child exits at once
    kind, _, rest = data.decode(errors="replace").partition(" ")
    pid, _, text = rest.partition(" ")
    if kind == "ok":
        print(f"master pid {pid}: {text}")
        return 0
    if kind == "error":
        print(f"deployer master: start failed: {text}", file=sys.stderr)
        return 1
    print(
        "deployer master: start failed: the master exited without a word (see its log)",
        file=sys.stderr,
    )
    return 1


# --- pidfile ---


def check_pidfile(path: str | None) -> None:
    if not path or not os.path.exists(path):
        return
    pid = read_pid(path)
    if pid is not None and pid != os.getpid() and is_master(pid):
        raise ConfigError(f"--pidfile: a master is already running with pid {pid} ({path})")


def read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # unreadable or garbage: a stale file we may replace


def is_master(pid: int) -> bool:
    """Alive and a deployer master (a stale pidfile's pid may have been reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"deployer" in f.read()
    except OSError:
        return False


def write_pidfile(path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    # never through a planted symlink, never into someone else's file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pidfile(path: str | None) -> None:
    if not path:
        return
    if read_pid(path) == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
