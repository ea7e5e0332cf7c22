"""The arbiter: one single-threaded loop that owns every worker.

Signals only queue themselves and wake the loop through a self-pipe
(signal.set_wakeup_fd); everything else (worker output, readiness messages,
control clients) is a file descriptor in one selector. Each pass of the loop:
wait for I/O or the next deadline, handle queued signals, reap children, then
`tick`: readiness timeouts, soak, drain deadlines, crash backoff, the running
reload's next step, and the worker count.

Workers sit in numbered slots (1..workers). A reload converts slot by slot: a
replacement is spawned next to the slot's worker, and the old one is drained
only once the replacement is ready and has stayed up for ready_soak, so the
number of ready workers never drops below `workers`. The next slot's
replacement boots while the previous one soaks.

The Arbiter keeps the loop, signals, spawning and reaping; two mixins add the
reload state machine (reload.py) and the control-socket clients and commands
(handlers.py). It gives its state to, and takes it from, the next code on a
self-upgrade (to_state, from_state; see upgrade.py).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from deployer.hostapi.workerenv import EnvFileError, dropped_note, read_env_file
from deployer.master import listener as listener_mod
from deployer.master.config import MasterConfig
from deployer.master.control import Connection, ControlServer
from deployer.master.guard import Guard
from deployer.master.handlers import ControlHandlers
from deployer.master.log import MasterLog, OutputStream, new_tail
from deployer.master.readiness import (
    READY_FD_ENV,
    NotifySocket,
    ReadyPipe,
    SystemdNotifier,
    how_to_signal,
    ready_pipe,
)
from deployer.master.reload import ReloadJob, Reloads
from deployer.master.slots import BACKOFF_BASE, Slot, stable
from deployer.master.worker import (
    CAUGHT_SIGNALS,
    Launch,
    Spec,
    Worker,
    describe_exit,
    fd_count,
    ready_fd_number,
    start_process,
    worker_env,
)

MAX_WAIT = 1.0  # the loop wakes at least this often
# Arbiter fields the upgrade state carries as they are (JSON values).
PLAIN_STATE = (
    "generation",
    "target",
    "counts",
    "last_reload",
    "job_ids",
    "announced",
    "started",
    "base_cwd",
    "upgrades",
    "backlog",
)
CRASH_LOG = 50  # crashes kept, with their times, for status (and a rollout's watch)


class Arbiter(Reloads, ControlHandlers):
    """The master's state and its loop; see the module docstring."""

    def __init__(
        self,
        config: MasterConfig,
        log: MasterLog,
        listener: socket.socket | None,
        control: ControlServer | None = None,
        announce: Callable[[bool, str], None] | None = None,
        notify: NotifySocket | None | bool = True,
        systemd: SystemdNotifier | None = None,
    ) -> None:
        self.cfg = config
        self.log = log
        # None: no listening socket (queue consumers): workers get no fd 3, no LISTEN_*
        self.listener = listener
        self.control = control
        # start mode: called once, (True, summary) when every worker is first
        # ready, or (False, reason) when a first worker fails to boot.
        self.announce = announce
        self.systemd = systemd if systemd is not None else SystemdNotifier.from_environment()
        # notify=True: our own datagram socket if readiness is notify; an upgrade
        # passes the inherited one (or None).
        if notify is True:
            notify = NotifySocket() if config.ready.mode == "notify" else None
        self.notify: NotifySocket | None = notify or None
        self.selector = selectors.DefaultSelector()
        self.signals: deque[int] = deque()
        self.wake_r, self.wake_w = os.pipe()
        self.base_cwd = os.getcwd()
        self.pinned = Spec(self.resolve_release() or self.base_cwd, 1)
        self.generation = 1
        self.target = config.workers
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, Worker] = {}  # every live worker by pid
        self.lingering: dict[int, float] = {}  # process groups whose leader exited: pgid -> kill at
        self.streams: dict[int, OutputStream] = {}
        self.guard = Guard()
        self.conns: dict[int, Connection] = {}
        self.job: ReloadJob | None = None
        self.queued: ReloadJob | None = None
        self.job_ids = 0
        self.stop_waiters: list[Connection] = []
        self.stopping = False
        self.immediate = False
        self.announced = False
        self.exit_code = 0
        self.started = time.time()
        self.counts = {"reloads": 0, "failed_reloads": 0, "crashes": 0}
        self.crash_log: list[dict[str, Any]] = []  # the latest CRASH_LOG crashes
        self.last_reload: dict[str, Any] | None = None
        # Every worker's listen() on fd 3 sets the shared queue's backlog (Node: 511,
        # asyncio: 100, gunicorn: 2048): we put ours back when a worker is ready.
        self.backlog = None if listener is None else listener_mod.backlog(listener)
        self.backlog_noted = False
        self.upgrades = 0  # successful in-place upgrades (re-execs) of this master
        self.upgrade_requester: Connection | None = None  # set on the resumed master

    # --- the loop ---

    def run(self, resumed: dict[str, Any] | None = None) -> int:
        self.install_signals()
        self.watch_fds()
        if resumed is None:
            self.guard.start(self.groups())
            where = self.listen_address()
            self.log.master(
                (f"listening on {where}" if where else "no listening socket")
                + f", {self.target} workers, ready {self.cfg.ready}, release {self.pinned.release}"
            )
        else:
            self.adopted(resumed)
        # Signals that came while we were exec'ing (blocked, pending) arrive now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT_SIGNALS)
        self.manage_workers(time.monotonic())
        while not (self.stopping and not self.workers and not self.lingering):
            self.wait(self.next_timeout(time.monotonic()))
            self.handle_signals()
            self.reap()
            self.tick(time.monotonic())
            self.update_connections()
        self.shutdown()
        return self.exit_code

    def adopted(self, state: dict[str, Any]) -> None:
        """First thing a re-exec'd master does: watch the inherited fds, answer."""
        for stream in self.streams.values():
            self.watch_output(stream)
        for w in self.workers.values():
            if w.ready_pipe is not None:
                self.watch_ready_pipe(w)
        for conn in self.conns.values():
            self.watch_connection(conn)
        self.answer_upgrade(state)

    def install_signals(self) -> None:
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        for sig in CAUGHT_SIGNALS:
            signal.signal(sig, self.queue_signal)

    def queue_signal(self, signum: int, frame: object) -> None:
        if len(self.signals) < 10:
            self.signals.append(signum)

    def watch_fds(self) -> None:
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.drain_wakeups)
        if self.notify is not None:
            self.selector.register(self.notify.fileno(), selectors.EVENT_READ, self.read_notify)
        if self.control is not None:
            self.selector.register(self.control.fileno(), selectors.EVENT_READ, self.accept_control)

    def wait(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            key.data(mask)  # every callback takes the event mask

    def drain_wakeups(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 4096):
                pass

    def next_timeout(self, now: float) -> float:
        """Sleep until the next future deadline (what is due now, tick just handled)."""
        deadlines = [now + MAX_WAIT]
        for w in self.workers.values():
            if w.state == "starting":
                deadlines.append(w.started_mono + self.cfg.ready_timeout)
                if self.cfg.ready.mode == "delay":
                    deadlines.append(w.started_mono + self.cfg.ready.delay)
            elif w.state == "ready" and w.ready_at is not None:
                deadlines.append(w.ready_at + self.cfg.ready_soak)
            if w.kill_at is not None:
                deadlines.append(w.kill_at)
        deadlines += [s.respawn_at for s in self.slots.values() if s.worker is None]
        deadlines += self.lingering.values()
        return min(d for d in deadlines if d > now) - now

    def tick(self, now: float) -> None:
        self.check_workers(now)
        self.kill_lingering(now)
        if self.stopping:
            return
        if self.job is not None:
            self.step_reload(self.job, now)
        self.manage_workers(now)
        self.check_all_ready()

    # --- signals ---

    def handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.popleft()
            if sig in (signal.SIGHUP, signal.SIGUSR2):
                self.log.master(f"{signal.Signals(sig).name}: reload requested")
                self.request_reload(None)
            elif sig == signal.SIGUSR1:
                self.log.reopen()  # worker output goes through our pipes: nothing else to do
            elif sig == signal.SIGTERM:
                self.begin_stop("SIGTERM")
            elif sig == signal.SIGINT:
                self.begin_stop("SIGINT", immediate=self.stopping)
            elif sig == signal.SIGQUIT:
                self.begin_stop("SIGQUIT", immediate=True)
            elif sig == signal.SIGTTIN:
                self.set_target(self.target + 1)
            elif sig == signal.SIGTTOU:
                self.set_target(max(1, self.target - 1))

    # --- children ---

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.worker_exited(worker, status)
            elif pid == self.guard.pid:
                self.log.master(f"guard pid {pid} {describe_exit(status)}: starting a new one")
                self.guard.close()
                self.guard.start(self.groups())

    def groups(self) -> list[int]:
        """Every worker process group that may still have members."""
        return [*self.workers, *self.lingering]

    def worker_exited(self, worker: Worker, status: int) -> None:
        now = time.monotonic()
        how = describe_exit(status) if worker.killed_for is None else worker.killed_for
        self.forget_ready_pipe(worker)
        for fd in worker.stream_fds:  # what it wrote last, for the failure report
            if fd in self.streams:
                self.read_stream(self.streams[fd])
        slot = self.slots.get(worker.id)
        if worker.state == "draining":
            self.log.master(f"{worker.label} stopped ({how})")
            self.linger(worker, worker.kill_at or now)
            self.drained(worker, how)
            return
        self.linger(worker, now)  # a crashed worker's leftovers go at once
        if self.stopping:
            self.log.master(f"{worker.label} exited ({how})")
        elif slot is not None and slot.replacement is worker:
            slot.replacement = None
            when = "before it was ready" if worker.ready_at is None else "within ready_soak"
            self.replacement_failed(slot, worker, f"{how} {when}")
        elif slot is not None and slot.worker is worker:
            slot.worker = None
            self.worker_crashed(slot, worker, how, now)
        else:
            self.log.master(f"{worker.label} exited ({how})")

    def worker_crashed(self, slot: Slot, worker: Worker, how: str, now: float) -> None:
        self.counts["crashes"] += 1
        crash = {"at": time.time(), "worker": slot.id, "pid": worker.pid, "how": how}
        self.crash_log = [
            *self.crash_log[1 - CRASH_LOG :],
            {**crash, "release": worker.spec.release},
        ]
        delay = slot.crashed(worker, now)
        loop = f", crash loop: restart in {delay:.1f}s" if delay else ""
        self.log.master(f"{worker.label} crashed ({how}){loop}")
        if not self.announced and self.announce is not None:
            tail = worker.last_stderr()
            self.boot_failed(
                f"{worker.label} {how} before it was ready" + (f":\n{tail}" if tail else "")
            )
            return
        self.crashed_during_reload(worker, how)

    def linger(self, worker: Worker, deadline: float) -> None:
        """The group leader is gone; anything left in its group gets SIGKILL at deadline."""
        try:
            os.killpg(worker.pid, 0)
            self.lingering[worker.pid] = deadline
        except (ProcessLookupError, PermissionError):
            self.guard.remove(worker.pid)

    def kill_lingering(self, now: float) -> None:
        for pgid, deadline in list(self.lingering.items()):
            try:
                os.killpg(pgid, signal.SIGKILL if deadline <= now else 0)
            except (ProcessLookupError, PermissionError):
                del self.lingering[pgid]
                self.guard.remove(pgid)

    def check_workers(self, now: float) -> None:
        for w in list(self.workers.values()):
            if w.state == "starting" and w.killed_for is None:
                if self.cfg.ready.mode == "delay" and w.uptime(now) >= self.cfg.ready.delay:
                    self.mark_ready(w, now)
                elif w.uptime(now) > self.cfg.ready_timeout:
                    self.not_ready_in_time(w)
            if w.kill_at is not None and now >= w.kill_at:
                self.log.master(f"{w.label} still alive after shutdown_timeout: SIGKILL")
                w.signal(signal.SIGKILL)
                w.kill_at = None
            if w.state == "ready" and stable(w, now):
                slot = self.slots.get(w.id)
                if slot is not None and slot.worker is w:
                    slot.crash_streak = 0

    def not_ready_in_time(self, w: Worker) -> None:
        slot = self.slots.get(w.id)
        reason = f"not ready within ready_timeout ({self.cfg.ready_timeout:g}s): " + how_to_signal(
            self.cfg.ready.mode
        )
        if slot is not None and slot.replacement is w:
            slot.replacement = None
            self.replacement_failed(slot, w, reason)
            return
        self.log.master(f"{w.label} {reason}: killed")
        if not self.announced and self.announce is not None:
            self.boot_failed(f"{w.label} {reason}")
        w.killed_for = reason  # the reap counts it as a crash, with this reason
        w.signal(signal.SIGKILL)

    def mark_ready(self, w: Worker, now: float) -> None:
        if w.state != "starting":
            return
        w.state = "ready"
        w.ready_at = now
        self.log.master(f"{w.label} ready after {w.uptime(now):.2f}s")
        self.restore_backlog(w)
        slot = self.slots.get(w.id)
        if self.job is not None and slot is not None and slot.replacement is w:
            self.job.emit("ready", w)

    def restore_backlog(self, w: Worker) -> None:
        """A worker's listen() shrank the accept queue all workers share: a burst of
        reconnects during a reload would overflow it (clients then wait for SYN
        retransmits, 1 s and more). listen() again with our backlog."""
        if self.backlog is None or self.listener is None:
            return
        theirs = listener_mod.backlog(self.listener)
        if theirs is not None and theirs != self.backlog:
            with contextlib.suppress(OSError):
                self.listener.listen(self.backlog)
            if not self.backlog_noted:
                self.backlog_noted = True
                self.log.master(
                    f"{w.label} set the listen backlog to {theirs}; put back to {self.backlog}"
                    " (noted once)"
                )

    # --- spawning ---

    def listen_address(self) -> str | None:
        """HOST:PORT or unix:PATH of the listening socket; None when there is none."""
        return None if self.listener is None else listener_mod.describe(self.listener)

    def resolve_release(self) -> str | None:
        """Where `cwd` points now (a `current` symlink is followed once, here)."""
        if self.cfg.cwd is None:
            return None
        return os.path.realpath(self.cfg.cwd)

    def spawn(self, slot: Slot, spec: Spec) -> Worker | None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = ready_pipe() if self.cfg.ready.mode == "pipe" else (None, None)
        try:
            pid = start_process(self.launch(slot, spec, out_w, err_w, ready_w))
        except OSError as e:
            self.log.master(f"cannot fork worker {slot.id}: {e}")
            close_fds(out_r, out_w, err_r, err_w, ready_r, ready_w)
            slot.respawn_at = time.monotonic() + BACKOFF_BASE
            return None
        close_fds(out_w, err_w, ready_w)
        worker = Worker(id=slot.id, pid=pid, spec=spec, stderr_tail=new_tail())
        worker.stream_fds = [out_r, err_r]
        self.workers[pid] = worker
        self.guard.add(pid)
        self.watch_stream(out_r, worker, None)
        self.watch_stream(err_r, worker, worker.stderr_tail)
        if ready_r is not None:
            worker.ready_pipe = ReadyPipe(ready_r)
            self.watch_ready_pipe(worker)
        self.log.master(f"{worker.label} spawned (release {spec.release})")
        return worker

    def env_file(self) -> dict[str, str]:
        """The variables in env_file (`deployer secrets`), read at every spawn: a
        reload gives the workers the current ones. A bad file is logged by its
        place, never its content (it holds secrets); a reserved name in it (LISTEN_FDS,
        DEPLOYER_*, ...) is logged and left out, never passed to a worker."""
        path = self.cfg.env_file
        if not path:
            return {}
        try:
            found = read_env_file(path)
        except EnvFileError as e:
            self.log.master(f"{e}; workers start without its variables")
            return {}
        if found.dropped:
            self.log.master(dropped_note(path, found.dropped))
        return found.values

    def launch(
        self, slot: Slot, spec: Spec, stdout: int, stderr: int, ready_w: int | None
    ) -> Launch:
        """How to start the slot's worker on `spec`, writing to these pipes."""
        extra = {
            **self.cfg.env,
            **self.env_file(),
            "DEPLOYER_WORKER_ID": str(slot.id),
            "DEPLOYER_RELEASE": spec.release,
            "PWD": spec.release,
        }
        if self.notify is not None:
            extra["NOTIFY_SOCKET"] = self.notify.address
        listener_fd = None if self.listener is None else self.listener.fileno()
        listen_fds = fd_count(listener_fd, self.cfg.listen_fds)  # 0: listen_fds is moot
        if ready_w is not None:
            extra[READY_FD_ENV] = str(ready_fd_number(listen_fds))
        return Launch(
            command=self.cfg.command,
            cwd=spec.release,
            env=worker_env(dict(os.environ), extra, listen_fds),
            listener_fd=listener_fd,
            stdout_fd=stdout,
            stderr_fd=stderr,
            ready_fd=ready_w,
            listen_fds=listen_fds,
        )

    def watch_stream(self, fd: int, worker: Worker, tail: deque[str] | None) -> None:
        os.set_blocking(fd, False)
        self.streams[fd] = OutputStream(fd, worker.label, self.log, tail)
        self.watch_output(self.streams[fd])

    def watch_output(self, stream: OutputStream) -> None:
        self.selector.register(
            stream.fd, selectors.EVENT_READ, lambda mask: self.read_stream(stream)
        )

    def read_stream(self, stream: OutputStream) -> None:
        if not stream.read():
            self.selector.unregister(stream.fd)
            os.close(stream.fd)
            del self.streams[stream.fd]

    def watch_ready_pipe(self, worker: Worker) -> None:
        assert worker.ready_pipe is not None
        self.selector.register(
            worker.ready_pipe.fd, selectors.EVENT_READ, lambda mask: self.read_ready_pipe(worker)
        )

    def read_ready_pipe(self, worker: Worker) -> None:
        pipe = worker.ready_pipe
        if pipe is None:
            return
        result = pipe.read()
        if result:
            self.mark_ready(worker, time.monotonic())
        if result is None or result:
            self.forget_ready_pipe(worker)

    def forget_ready_pipe(self, worker: Worker) -> None:
        if worker.ready_pipe is not None:
            self.selector.unregister(worker.ready_pipe.fd)
            os.close(worker.ready_pipe.fd)
            worker.ready_pipe = None

    def read_notify(self, mask: int) -> None:
        assert self.notify is not None
        for note in self.notify.receive():
            worker = self.worker_for_pid(note.pid)
            if worker is None or note.uid not in (os.getuid(), 0):
                continue
            if "STATUS" in note.fields:
                worker.status_text = note.fields["STATUS"]
            if note.ready:
                self.mark_ready(worker, time.monotonic())

    def worker_for_pid(self, pid: int) -> Worker | None:
        """The worker itself, or the worker whose process group the sender is in."""
        if pid in self.workers:
            return self.workers[pid]
        try:
            return self.workers.get(os.getpgid(pid))
        except OSError:
            return None

    # --- the worker count (slots) ---

    def manage_workers(self, now: float) -> None:
        if self.job is None:
            self.resize_slots()
        for slot in self.slots.values():
            if slot.worker is None and slot.replacement is None and now >= slot.respawn_at:
                slot.worker = self.spawn(slot, self.pinned)

    def resize_slots(self) -> None:
        for sid in range(1, self.target + 1):
            self.slots.setdefault(sid, Slot(sid))
        for sid in [s for s in self.slots if s > self.target]:
            slot = self.slots.pop(sid)
            for w in (slot.worker, slot.replacement):
                if w is not None:
                    self.retire(w)

    def set_target(self, n: int) -> None:
        self.log.master(f"scale: {self.target} -> {n} workers")
        self.target = n

    def retire(self, w: Worker, now: float | None = None, sig: int | None = None) -> None:
        """Drain: stop_signal now, SIGKILL at shutdown_timeout."""
        now = time.monotonic() if now is None else now
        if w.state == "draining" and sig is None:
            return
        w.state = "draining"
        sig = self.cfg.stop_signal if sig is None else sig
        w.kill_at = None if sig == signal.SIGKILL else now + self.cfg.shutdown_timeout
        w.signal(sig)

    def check_all_ready(self) -> None:
        if self.announced or len(self.slots) < self.target:
            return
        if all(s.worker is not None and s.worker.state == "ready" for s in self.slots.values()):
            self.announced = True
            where = self.listen_address()
            summary = f"{len(self.slots)} workers ready " + (
                f"on {where}" if where else "(no listening socket)"
            )
            self.log.master(summary)
            self.systemd.send(READY=1, STATUS=summary, MAINPID=os.getpid())
            if self.announce is not None:
                self.announce(True, summary)

    def boot_failed(self, reason: str) -> None:
        """start mode: a first worker never got ready; report, and stop."""
        self.announced = True
        self.log.master(f"start failed: {reason}")
        if self.announce is not None:
            self.announce(False, reason)
        self.exit_code = 1
        self.begin_stop("start failed", immediate=True)

    # --- stop ---

    def begin_stop(self, why: str, immediate: bool = False) -> None:
        if self.stopping and not immediate:
            return
        if immediate and self.immediate:
            return
        self.log.master(f"{why}: {'stopping now' if immediate else 'graceful stop'}")
        self.stopping = True
        self.immediate = immediate
        self.systemd.send(STOPPING=1)
        self.cancel_reloads("the master is stopping")
        now = time.monotonic()
        for w in self.workers.values():
            self.retire(w, now, sig=signal.SIGKILL if immediate else None)
        if immediate:
            self.lingering = dict.fromkeys(self.lingering, now)

    def shutdown(self) -> None:
        self.log.master(f"stopped (exit {self.exit_code})")
        for conn in self.stop_waiters:
            conn.send({"ok": True, "stopped": os.getpid()})
        self.flush_connections(1.0)
        for conn in self.conns.values():
            conn.sock.close()
        if self.control is not None:
            self.control.close()
        if self.listener is not None:
            self.listener.close()
        self.guard.close()
        signal.set_wakeup_fd(-1)

    # --- state: what the next code adopts on a self-upgrade (see upgrade.py) ---

    def to_state(self, requester: Connection | None = None) -> dict[str, Any]:
        """This master as JSON, its fds by number; `requester` is the client the
        next master answers."""
        return {
            "config": self.cfg.to_dict(),
            "fds": {
                "listener": None if self.listener is None else self.listener.fileno(),
                "notify": None if self.notify is None else self.notify.fileno(),
                "control": None if self.control is None else self.control.fileno(),
                "guard": self.guard.fd,
            },
            "guard_pid": self.guard.pid,
            "systemd": self.systemd.address,
            "log": {"path": self.log.path, "stderr_captured": self.log.stderr_captured},
            "pinned": [self.pinned.release, self.pinned.generation],
            "slots": [s.to_state() for s in self.slots.values()],
            "workers": [w.to_state() for w in self.workers.values()],
            "streams": [s.to_state(self.stderr_owner(s)) for s in self.streams.values()],
            "lingering": {str(k): v for k, v in self.lingering.items()},
            "conns": [c.to_state(c is requester) for c in self.conns.values() if not c.closed],
            **{key: getattr(self, key) for key in PLAIN_STATE},
            "crash_log": self.crash_log,  # not in PLAIN_STATE: the previous version has none
        }

    def stderr_owner(self, stream: OutputStream) -> int | None:
        """The pid of the worker whose stderr tail the stream feeds, if any."""
        return next((w.pid for w in self.workers.values() if stream.tail is w.stderr_tail), None)

    @classmethod
    def from_state(cls, state: dict[str, Any], dry_run: bool = False) -> Arbiter:
        """The master that to_state gave, on the fds it left open; dry_run (the
        upgrade's preflight) builds it without touching any fd.

        Everything that can fail is done before the first inherited fd is wrapped,
        so a failure leaves the fds as they were for the exec back.
        """
        cfg = MasterConfig.from_dict(state["config"])
        workers = {w.pid: w for w in map(Worker.from_state, state["workers"])}
        slots = {d["id"]: Slot.from_state(d, workers) for d in state["slots"]}
        lingering = {int(k): float(v) for k, v in state["lingering"].items()}
        pinned = Spec(*state["pinned"])
        plain = {key: state[key] for key in PLAIN_STATE}
        arb = cls.without_fds(cfg) if dry_run else cls.on_inherited_fds(cfg, state)
        arb.guard = Guard(state["guard_pid"], None if dry_run else state["fds"]["guard"])
        arb.pinned, arb.lingering, arb.workers, arb.slots = pinned, lingering, workers, slots
        for key, value in plain.items():
            setattr(arb, key, value)
        arb.crash_log = state.get("crash_log", [])
        if not dry_run:
            arb.adopt_streams(state["streams"])
            arb.adopt_connections(state["conns"])
        return arb

    @classmethod
    def without_fds(cls, cfg: MasterConfig) -> Arbiter:
        return cls(cfg, MasterLog(None), None, None, notify=None, systemd=SystemdNotifier(None))

    @classmethod
    def on_inherited_fds(cls, cfg: MasterConfig, state: dict[str, Any]) -> Arbiter:
        fds = state["fds"]
        log = MasterLog(state["log"]["path"])
        if state["log"]["stderr_captured"]:
            log.capture_stderr()
        control = None
        if fds["control"] is not None:
            control = ControlServer(cfg.socket or "", socket.socket(fileno=fds["control"]))
        notify = None
        if fds["notify"] is not None:
            notify = NotifySocket(socket.socket(fileno=fds["notify"]))
        listener = None  # a master without a listening socket has none to hand on
        if fds["listener"] is not None:
            listener = socket.socket(fileno=fds["listener"])
            if cfg.nonblocking:  # a reconfigure may have turned it on; never off: workers
                listener.setblocking(False)  # share the flag, and some set it themselves
        systemd = SystemdNotifier(state["systemd"])
        return cls(cfg, log, listener, control, notify=notify, systemd=systemd)

    def adopt_streams(self, streams: list[dict[str, Any]]) -> None:
        for d in streams:
            owner = self.workers.get(d["stderr_of"]) if d["stderr_of"] else None
            tail = owner.stderr_tail if owner else None
            self.streams[d["fd"]] = OutputStream.from_state(d, self.log, tail)


def close_fds(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)
