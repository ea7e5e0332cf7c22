"""Handover: a new master takes over a running one on the same control socket,
without a failed request. This is how the unit `deployer setup` installs takes
over a master that `deployer master start` daemonized: its ExecStart is
`master run --config master.toml`, and `run` finds a master answering on the
socket that master.toml names.

    new master (`master run`)                  running master
    {"cmd": "handover"}                   ->   refuses while stopping, reloading
                                               or not every worker is ready
                                          <-   {"event": "handover", pid, release,
                                               listen} with its listening socket
                                               (SCM_RIGHTS); listen null and no fd
                                               from a master without one
    binds its control socket beside the old one (run/.h<pid>) and starts every
    worker on the same listening socket: one accept queue, both masters' workers
    serve it. Once every new worker is ready:
    renames its control socket over the old path (clients now reach it), writes
    the pidfile, then
    {"cmd": "stop"}                       ->   graceful stop: its workers drain
                                          <-   {"event": "stopping"}
    READY=1 to systemd (NOTIFY_SOCKET).

A master without a listening socket (queue consumers) hands over none; the
new master then binds its own `listen` if it has one, else runs without.

If a new worker exits or is not ready within ready_timeout, the new master
kills its own workers and exits 1; the connection closes and the running master
goes on as before (it only gave a copy of its socket away).

`give` is the running master's side (the arbiter's `handover` command); the
rest is the new master's. Nothing here imports the arbiter.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Any, Callable

from deployer.master import listener as listener_mod
from deployer.master.config import MasterConfig
from deployer.master.control import (
    CREDENTIALS,
    Connection,
    ControlError,
    ControlServer,
    answers,
    encode,
)
from deployer.master.readiness import SystemdNotifier

TIMEOUT = 10.0  # each exchange with the running master


class HandoverError(ControlError):
    """The running master did not hand over (exit 1: nothing changed)."""


# --- the running master's side ------------------------------------------------------


def give(arbiter: Any, conn: Connection) -> None:
    """`handover`: send our listening socket (if we have one) to the client, keep
    serving until it says stop (or goes away: then nothing happened)."""
    refusal = None
    if arbiter.stopping:
        refusal = "the master is stopping"
    elif arbiter.job is not None or arbiter.queued is not None:
        refusal = "a reload is running; hand over once it has ended"
    elif not arbiter.announced:
        refusal = "the workers are not all ready yet"
    if refusal is not None:
        conn.send({"ok": False, "error": f"handover refused: {refusal}"})
        return
    peer = peer_pid(conn.sock)
    listener = arbiter.listener
    message = {
        "event": "handover",
        "pid": os.getpid(),
        "release": arbiter.pinned.release,
        "listen": None if listener is None else listener_mod.describe(listener),
    }
    conn.flush_blocking(1.0)
    try:
        conn.sock.settimeout(2.0)
        fds = [] if listener is None else [listener.fileno()]
        socket.send_fds(conn.sock, [encode(message)], fds)
    except OSError as e:
        arbiter.log.master(f"handover to pid {peer}: cannot send the listening socket: {e}")
        conn.closed = True
        return
    finally:
        conn.sock.setblocking(False)
    gave = "the listening socket went to" if listener is not None else "no listening socket for"
    arbiter.log.master(f"handover: {gave} pid {peer}; serving until it says stop")


def peer_pid(sock: socket.socket) -> int:
    pid, _, _ = CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDENTIALS.size)
    )
    return pid


# --- the new master's side ----------------------------------------------------------


def wanted(cfg: MasterConfig) -> bool:
    """Does a master answer on the socket we are configured for?"""
    return bool(cfg.socket) and os.path.exists(cfg.socket or "") and answers(cfg.socket or "")


class Handover:
    """The new master's half: request, then complete (or abort)."""

    def __init__(self, cfg: MasterConfig, write_pid: Callable[[], None]) -> None:
        assert cfg.socket
        self.cfg = cfg
        self.path: str = cfg.socket
        self.write_pid = write_pid
        self.conn: socket.socket | None = None
        self.old_pid: int | None = None
        self.old_release: str | None = None
        self.arbiter: Any = None  # set once it exists
        self.control: ControlServer | None = None
        self.started = time.monotonic()
        self.done = False

    @property
    def control_path(self) -> str:
        """Where our control socket waits until we take the old one's place: the same
        directory (a rename), a name no longer than master.sock."""
        return os.path.join(os.path.dirname(self.path), f".h{os.getpid()}")

    def request(self) -> socket.socket | None:
        """The running master's listening socket (a copy of the same open socket);
        None from a master without one."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        answer: dict[str, Any] = {}
        try:
            sock.settimeout(TIMEOUT)
            sock.connect(self.path)
            sock.sendall(encode({"cmd": "handover"}))
            buffer = b""
            while b"\n" not in buffer:
                data, got, _, _ = socket.recv_fds(sock, 65536, 4)
                fds += got
                if not data:
                    break
                buffer += data
            line = buffer.split(b"\n", 1)[0]
            if line.strip():
                answer = json.loads(line)
        except (OSError, ValueError) as e:
            close_all(fds)
            sock.close()
            raise HandoverError(f"handover from the master on {self.path} failed: {e}") from None
        # A master without a listening socket says `"listen": null` and sends no fd;
        # every other one (and every earlier version) sends exactly one.
        socketless = "listen" in answer and answer["listen"] is None
        if answer.get("event") != "handover" or len(fds) != (0 if socketless else 1):
            close_all(fds)
            sock.close()
            error = str(answer.get("error") or "it closed the connection")
            if "unknown command" in error:
                error = (
                    "it runs a deployer that cannot hand over; upgrade it first"
                    " (`deployer setup` does, or `master upgrade`)"
                )
            raise HandoverError(f"the master on {self.path} did not hand over: {error}")
        self.conn = sock
        self.old_pid = answer.get("pid")
        self.old_release = answer.get("release")
        if socketless:
            return None
        listener = socket.socket(fileno=fds[0])
        os.set_inheritable(listener.fileno(), False)
        return listener

    def notifier(self) -> SystemdNotifier:
        return ReadyHook(SystemdNotifier.from_environment(), self.complete)

    def announce(self, ok: bool, text: str) -> None:
        """The arbiter's verdict on our first workers (start mode's callback)."""
        if not ok:
            self.abort(text)

    def complete(self) -> None:
        """Every new worker is ready: take the old master's place, tell it to drain."""
        if self.done:
            return
        self.done = True
        arb = self.arbiter
        try:
            ctl = arb.control
            os.rename(ctl.path, self.path)
            ctl.path = self.path  # the same inode: close() removes it only if still ours
        except OSError as e:
            self.fail(f"cannot move the control socket to {self.path}: {e}")
            return
        self.write_pid()
        took = time.monotonic() - self.started
        said = self.stop_old()
        arb.log.master(f"took over from master pid {self.old_pid} after {took:.2f}s: {said}")
        if arb.cfg.cwd and os.path.realpath(arb.cfg.cwd) != arb.pinned.release:
            # a switch while we booted: the old master would have reloaded; we do
            arb.log.master("current moved during the handover: reloading")
            arb.request_reload(None)

    def stop_old(self) -> str:
        assert self.conn is not None
        try:
            self.conn.settimeout(TIMEOUT)
            self.conn.sendall(encode({"cmd": "stop"}))
            buffer = b""
            while b"\n" not in buffer:
                data = self.conn.recv(4096)
                if not data:
                    break
                buffer += data
            answer = json.loads(buffer.split(b"\n", 1)[0] or b"{}")
        except (OSError, ValueError) as e:
            return f"could not ask it to stop ({e}); it still serves: stop it (pid {self.old_pid})"
        finally:
            self.conn.close()
        if answer.get("event") == "stopping" or answer.get("ok"):
            return "it drains its workers and exits"
        return f"it did not stop ({answer.get('error', answer)}): stop it (pid {self.old_pid})"

    def fail(self, reason: str) -> None:
        """The last step failed: the old master keeps serving; we stop, exit 1."""
        self.abort(reason)
        self.arbiter.exit_code = 1
        self.arbiter.begin_stop("handover failed", immediate=True)

    def abort(self, reason: str) -> None:
        text = f"handover from master pid {self.old_pid} abandoned, it keeps serving: {reason}"
        print(f"deployer master: {text}", file=sys.stderr, flush=True)
        if self.arbiter is not None:
            self.arbiter.log.master(text)
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()


class ReadyHook(SystemdNotifier):
    """systemd's notifier, which first completes the handover at the first READY=1
    (every new worker ready), so that systemd hears READY only once we serve alone."""

    def __init__(self, inner: SystemdNotifier, on_ready: Callable[[], None]) -> None:
        super().__init__(inner.address)
        self.on_ready = on_ready
        self.fired = False

    def send(self, **fields: object) -> None:
        if not self.fired and str(fields.get("READY")) == "1":
            self.fired = True
            self.on_ready()
        super().send(**fields)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
