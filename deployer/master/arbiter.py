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
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deployer.master import listener as listener_mod
from deployer.master import upgrade
from deployer.master.config import MasterConfig
from deployer.master.control import Connection, ControlServer
from deployer.master.guard import Guard
from deployer.master.log import MasterLog, OutputStream, new_tail
from deployer.master.readiness import (
    READY_FD_ENV,
    NotifySocket,
    ReadyPipe,
    SystemdNotifier,
    ready_pipe,
)
from deployer.master.worker import (
    CAUGHT_SIGNALS,
    Launch,
    Spec,
    Worker,
    describe_exit,
    ready_fd_number,
    rss_bytes,
    start_process,
    worker_env,
)

BACKOFF_BASE = 0.5  # seconds before the 2nd restart in a crash loop; doubles after
BACKOFF_CAP = 30.0
STABLE_AFTER = 10.0  # a worker up this long after being ready ends a crash loop
REVERT_ATTEMPTS = 3  # tries per slot to go back to the pinned release after a failed reload
MAX_WAIT = 1.0  # the loop wakes at least this often


@dataclass
class Slot:
    id: int
    worker: Worker | None = None  # the slot's serving (or starting) worker
    replacement: Worker | None = None  # a reload's candidate for this slot
    restarts: int = 0
    crash_streak: int = 0
    respawn_at: float = 0.0  # crash backoff: no spawn before this (monotonic)


@dataclass
class ReloadJob:
    id: int
    subscribers: list[Connection] = field(default_factory=list)
    target: Spec | None = None  # set when the job starts
    previous: Spec | None = None
    queue: list[int] = field(default_factory=list)  # slot ids still to convert
    draining: set[int] = field(default_factory=set)  # pids retired by this job, not yet gone
    reverting: bool = False
    error: str | None = None
    revert_attempts: dict[int, int] = field(default_factory=dict)
    unreverted: list[int] = field(default_factory=list)
    started: float = 0.0

    @property
    def spec(self) -> Spec:
        spec = self.previous if self.reverting else self.target
        assert spec is not None
        return spec


class Arbiter:
    def __init__(
        self,
        config: MasterConfig,
        log: MasterLog,
        listener: socket.socket,
        control: ControlServer | None = None,
        announce: Callable[[bool, str], None] | None = None,
        notify: NotifySocket | None | bool = True,
        systemd: SystemdNotifier | None = None,
    ) -> None:
        self.cfg = config
        self.log = log
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
        self.last_reload: dict[str, Any] | None = None
        # Every worker's listen() on fd 3 sets the shared queue's backlog (Node: 511,
        # asyncio: 100, gunicorn: 2048): we put ours back when a worker is ready.
        self.backlog = listener_mod.backlog(listener)
        self.backlog_noted = False
        self.upgrades = 0  # successful in-place upgrades (re-execs) of this master
        self.upgrade_requester: Connection | None = None  # set on the resumed master

    # --- the loop ---

    def run(self, resumed: dict[str, Any] | None = None) -> int:
        self.install_signals()
        self.watch_fds()
        if resumed is None:
            self.guard.start(self.groups())
            self.log.master(
                f"listening on {listener_mod.describe(self.listener)}, {self.target} workers,"
                f" ready {self.cfg.ready}, release {self.pinned.release}"
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
            if self.job is not None and worker.pid in self.job.draining:
                self.job.draining.discard(worker.pid)
                self.emit(self.job, "stopped", worker, status=how)
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
        slot.restarts += 1
        stable = worker.ready_at is not None and now - worker.ready_at >= STABLE_AFTER
        slot.crash_streak = 1 if stable else slot.crash_streak + 1
        delay = backoff(slot.crash_streak)
        slot.respawn_at = now + delay
        loop = f", crash loop: restart in {delay:.1f}s" if delay else ""
        self.log.master(f"{worker.label} crashed ({how}){loop}")
        if not self.announced and self.announce is not None:
            tail = worker.last_stderr()
            self.boot_failed(
                f"{worker.label} {how} before it was ready" + (f":\n{tail}" if tail else "")
            )
            return
        job = self.job
        if job is not None and not job.reverting and worker.spec == job.target:
            self.abort_reload(job, f"{worker.label} of the new release {how}", worker)

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
            if w.state == "ready" and w.ready_at is not None and now - w.ready_at >= STABLE_AFTER:
                slot = self.slots.get(w.id)
                if slot is not None and slot.worker is w:
                    slot.crash_streak = 0

    def not_ready_in_time(self, w: Worker) -> None:
        slot = self.slots.get(w.id)
        reason = (
            f"not ready within ready_timeout ({self.cfg.ready_timeout:g}s, ready {self.cfg.ready})"
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
            self.emit(self.job, "ready", w)

    def restore_backlog(self, w: Worker) -> None:
        """A worker's listen() shrank the accept queue all workers share: a burst of
        reconnects during a reload would overflow it (clients then wait for SYN
        retransmits, 1 s and more). listen() again with our backlog."""
        if self.backlog is None:
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

    def resolve_release(self) -> str | None:
        """Where `cwd` points now (a `current` symlink is followed once, here)."""
        if self.cfg.cwd is None:
            return None
        return os.path.realpath(self.cfg.cwd)

    def spawn(self, slot: Slot, spec: Spec) -> Worker | None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = ready_pipe() if self.cfg.ready.mode == "pipe" else (None, None)
        extra = {
            **self.cfg.env,
            "DEPLOYER_WORKER_ID": str(slot.id),
            "DEPLOYER_RELEASE": spec.release,
            "PWD": spec.release,
        }
        if self.notify is not None:
            extra["NOTIFY_SOCKET"] = self.notify.address
        if ready_w is not None:
            extra[READY_FD_ENV] = str(ready_fd_number(self.cfg.listen_fds))
        launch = Launch(
            command=self.cfg.command,
            cwd=spec.release,
            env=worker_env(dict(os.environ), extra, self.cfg.listen_fds),
            listener_fd=self.listener.fileno(),
            stdout_fd=out_w,
            stderr_fd=err_w,
            ready_fd=ready_w,
            listen_fds=self.cfg.listen_fds,
        )
        try:
            pid = start_process(launch)
        except OSError as e:
            self.log.master(f"cannot fork worker {slot.id}: {e}")
            for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
                if fd is not None:
                    os.close(fd)
            slot.respawn_at = time.monotonic() + BACKOFF_BASE
            return None
        for fd in (out_w, err_w, ready_w):
            if fd is not None:
                os.close(fd)
        worker = Worker(id=slot.id, pid=pid, spec=spec, stderr_tail=new_tail())
        worker.stream_fds = [out_r, err_r]
        self.workers[pid] = worker
        self.guard.add(pid)
        self.watch_stream(out_r, worker, None)
        self.watch_stream(err_r, worker, worker.stderr_tail)
        if ready_r is not None:
            worker.ready_pipe = ReadyPipe(ready_r)
            self.selector.register(
                ready_r, selectors.EVENT_READ, lambda mask: self.read_ready_pipe(worker)
            )
        self.log.master(f"{worker.label} spawned (release {spec.release})")
        return worker

    def watch_stream(self, fd: int, worker: Worker, tail: deque[str] | None) -> None:
        os.set_blocking(fd, False)
        stream = OutputStream(fd, worker.label, self.log, tail)
        self.streams[fd] = stream
        self.selector.register(fd, selectors.EVENT_READ, lambda mask: self.read_stream(stream))

    def read_stream(self, stream: OutputStream) -> None:
        if not stream.read():
            self.selector.unregister(stream.fd)
            os.close(stream.fd)
            del self.streams[stream.fd]

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
            summary = f"{len(self.slots)} workers ready on {listener_mod.describe(self.listener)}"
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

    # --- reload ---

    def request_reload(self, conn: Connection | None) -> None:
        if self.stopping:
            if conn is not None:
                conn.send({"ok": False, "error": "the master is stopping"})
            return
        if self.job is None:
            self.job_ids += 1
            self.job = ReloadJob(self.job_ids)
            self.subscribe(self.job, conn)
            self.start_reload(self.job)
            return
        if self.queued is None:
            self.job_ids += 1
            self.queued = ReloadJob(self.job_ids)
        self.subscribe(self.queued, conn)
        if conn is not None:
            conn.send({"event": "queued", "reload": self.queued.id, "behind": self.job.id})

    def subscribe(self, job: ReloadJob, conn: Connection | None) -> None:
        if conn is not None:
            job.subscribers.append(conn)

    def start_reload(self, job: ReloadJob) -> None:
        job.started = time.monotonic()
        job.previous = self.pinned
        release = self.resolve_release() or self.pinned.release
        self.generation += 1
        job.target = Spec(release, self.generation)
        job.queue = sorted(self.slots)
        self.systemd.send(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )
        self.log.master(f"reload {job.id}: {job.previous.release} -> {release}")
        self.broadcast(
            job,
            {
                "event": "started",
                "reload": job.id,
                "release": release,
                "from": job.previous.release,
            },
        )
        if not os.path.isdir(release):
            job.error = f"release directory {release} does not exist"
            job.queue = []

    def step_reload(self, job: ReloadJob, now: float) -> None:
        # Up to reload_batch replacements boot at a time, and the next batch may
        # boot while the previous one soaks (so soaks overlap instead of adding
        # up): at most 2 x reload_batch candidates exist at once. Old workers are
        # still stopped only once their own replacement is ready and soaked.
        batch = self.cfg.reload_batch
        in_flight = [s for s in self.slots.values() if s.replacement is not None]
        booting = sum(1 for s in in_flight if s.replacement and s.replacement.ready_at is None)
        while booting < batch and len(in_flight) < 2 * batch and job.queue:
            slot = self.slots.get(job.queue.pop(0))
            if slot is None or (slot.worker is not None and slot.worker.spec == job.spec):
                continue
            slot.replacement = self.spawn(slot, job.spec)
            if slot.replacement is None:
                self.replacement_failed(slot, None, "could not be started (fork failed)")
                return
            self.emit(job, "spawned", slot.replacement)
            in_flight.append(slot)
            booting += 1
        for slot in in_flight:
            w = slot.replacement
            soaked = w is not None and w.ready_at is not None and w.state == "ready"
            if soaked and now - w.ready_at >= self.cfg.ready_soak:
                self.promote(job, slot, now)
        if not job.queue and not in_flight and not job.draining:
            self.finish_reload(job)

    def promote(self, job: ReloadJob, slot: Slot, now: float) -> None:
        old, slot.worker, slot.replacement = slot.worker, slot.replacement, None
        slot.crash_streak = 0
        if old is not None:
            self.retire(old, now)
            job.draining.add(old.pid)
            self.emit(job, "draining", old)

    def replacement_failed(self, slot: Slot, w: Worker | None, reason: str) -> None:
        job = self.job
        label = f"worker {slot.id}" if w is None else w.label
        tail = "" if w is None else w.last_stderr()
        message = f"{label} (release {job.spec.release if job else '?'}) {reason}"
        if tail:
            message += f"; last lines of its stderr:\n{tail}"
        self.log.master(f"reload: {message}")
        if w is not None and w.pid in self.workers:
            self.retire(w, sig=signal.SIGKILL)
            if job is not None:
                job.draining.add(w.pid)
        if job is None:
            return
        if not job.reverting:
            self.abort_reload(job, message, w)
            return
        attempts = job.revert_attempts.get(slot.id, 0) + 1
        job.revert_attempts[slot.id] = attempts
        if attempts < REVERT_ATTEMPTS:
            job.queue.insert(0, slot.id)
        else:
            job.unreverted.append(slot.id)

    def abort_reload(self, job: ReloadJob, error: str, failed: Worker | None) -> None:
        """Kill the new release's candidates and convert converted slots back."""
        job.error = error
        job.reverting = True
        for slot in self.slots.values():
            w = slot.replacement
            if w is not None and w is not failed:
                slot.replacement = None
                self.retire(w, sig=signal.SIGKILL)
                job.draining.add(w.pid)
        assert job.target is not None
        job.queue = [s.id for s in self.slots.values() if s.worker and s.worker.spec == job.target]
        self.broadcast(
            job, {"event": "aborting", "reload": job.id, "error": error, "reverting": job.queue}
        )

    def finish_reload(self, job: ReloadJob) -> None:
        seconds = round(time.monotonic() - job.started, 3)
        assert job.target is not None
        if job.error is None:
            self.pinned = job.target
            self.counts["reloads"] += 1
            result: dict[str, Any] = {
                "ok": True,
                "reload": job.id,
                "release": job.target.release,
                "seconds": seconds,
            }
            self.log.master(f"reload {job.id} done in {seconds}s: release {job.target.release}")
        else:
            self.counts["failed_reloads"] += 1
            error = job.error
            if job.unreverted:
                error += (
                    f" (slots {job.unreverted} could not be reverted and still run the new release)"
                )
            result = {
                "ok": False,
                "reload": job.id,
                "error": error,
                "seconds": seconds,
                "release": self.pinned.release,
            }
            self.log.master(
                f"reload {job.id} failed after {seconds}s; release stays {self.pinned.release}"
            )
        self.last_reload = {k: v for k, v in result.items()}
        self.systemd.send(
            READY=1,
            STATUS=f"reload {job.id} {'ok' if result['ok'] else 'failed'}: {self.pinned.release}",
        )
        self.broadcast(job, result)
        self.job, self.queued = self.queued, None
        if self.job is not None:
            self.start_reload(self.job)

    def emit(self, job: ReloadJob, event: str, w: Worker, **extra: Any) -> None:
        message = {
            "event": event,
            "reload": job.id,
            "worker": w.id,
            "pid": w.pid,
            "release": w.spec.release,
            **extra,
        }
        if job.reverting:
            message["phase"] = "revert"
        self.broadcast(job, message)

    def broadcast(self, job: ReloadJob, message: dict[str, Any]) -> None:
        for conn in job.subscribers:
            conn.send(message)

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
        for job in (self.job, self.queued):
            if job is not None:
                self.broadcast(
                    job, {"ok": False, "reload": job.id, "error": "the master is stopping"}
                )
        self.job = self.queued = None
        now = time.monotonic()
        for w in self.workers.values():
            self.retire(w, now, sig=signal.SIGKILL if immediate else None)
        if immediate:
            self.lingering = dict.fromkeys(self.lingering, now)

    def shutdown(self) -> None:
        self.log.master(f"stopped (exit {self.exit_code})")
        for conn in self.stop_waiters:
            conn.send({"ok": True, "stopped": os.getpid()})
        for conn in self.conns.values():
            conn.flush_blocking(1.0)
            conn.sock.close()
        if self.control is not None:
            self.control.close()
        self.listener.close()
        self.guard.close()
        signal.set_wakeup_fd(-1)

    # --- control socket ---

    def accept_control(self, mask: int) -> None:
        assert self.control is not None
        while True:
            conn = self.control.accept()
            if conn is None:
                return
            if isinstance(conn, str):
                self.log.master(conn)
                continue
            self.conns[conn.fileno()] = conn
            self.selector.register(
                conn, selectors.EVENT_READ, lambda mask, c=conn: self.serve(c, mask)
            )

    def serve(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            conn.flush()
        if not mask & selectors.EVENT_READ:
            return
        requests = conn.read_requests()
        if requests is None:
            conn.closed = True
            return
        for message in requests:
            self.handle_request(conn, message)

    def handle_request(self, conn: Connection, message: dict[str, Any]) -> None:
        cmd = message.get("cmd")
        if cmd == "status":
            conn.send({"ok": True, "status": self.status()})
        elif cmd == "reload":
            self.request_reload(conn)
        elif cmd == "scale":
            self.control_scale(conn, message.get("workers"))
        elif cmd == "upgrade":
            self.request_upgrade(conn, message)
        elif cmd == "stop":
            conn.send({"event": "stopping", "pid": os.getpid()})
            self.stop_waiters.append(conn)
            self.begin_stop("stop requested")
        else:
            conn.send(
                {
                    "ok": False,
                    "error": f"unknown command {cmd!r}"
                    " (expected status, reload, scale, stop, upgrade)",
                }
            )

    def control_scale(self, conn: Connection, n: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            conn.send({"ok": False, "error": f"scale: expected a positive integer, got {n!r}"})
            return
        if self.stopping:
            conn.send({"ok": False, "error": "the master is stopping"})
            return
        was = self.target
        self.set_target(n)
        answer = {"ok": True, "workers": n, "was": was}
        if self.job is not None:
            answer["note"] = "applied when the running reload ends"
        conn.send(answer)

    def update_connections(self) -> None:
        for fd, conn in list(self.conns.items()):
            if conn.closed:
                self.drop_connection(fd, conn)
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
            if self.selector.get_key(conn).events != events:
                self.selector.modify(conn, events, self.selector.get_key(conn).data)

    def drop_connection(self, fd: int, conn: Connection) -> None:
        self.selector.unregister(conn)
        conn.sock.close()
        del self.conns[fd]
        for job in (self.job, self.queued):
            if job is not None and conn in job.subscribers:
                job.subscribers.remove(conn)
        if conn in self.stop_waiters:
            self.stop_waiters.remove(conn)

    # --- self-upgrade (see upgrade.py) ---

    def request_upgrade(self, conn: Connection, message: dict[str, Any]) -> None:
        """Check the new code, then re-exec in place; the new master answers `conn`."""
        code = message.get("code") or upgrade.code_root()
        refusal = None
        if self.stopping:
            refusal = "the master is stopping"
        elif self.job is not None or self.queued is not None:
            refusal = "a reload is running; upgrade once it has ended"
        elif not self.announced:
            refusal = "the workers are not all ready yet"
        elif not isinstance(code, str) or not os.path.exists(code):
            # a directory holding the package, or the zipapp deployer setup installs
            refusal = f"code {code!r} does not exist"
        if refusal is not None:
            conn.send({"ok": False, "error": f"upgrade refused: {refusal}"})
            return
        simulate = bool(message.get("simulate_adopt_failure"))
        conn.send(
            {
                "event": "checking",
                "code": code,
                "message": f"checking that the code in {code} can adopt this master",
            }
        )
        error = upgrade.preflight(upgrade.snapshot(self, conn, code, simulate), code)
        if error is not None:
            error = f"the new code in {code} failed its check, nothing changed: {error}"
            self.log.master(f"upgrade: {error}")
            conn.send({"ok": False, "error": error})
            return
        conn.send(
            {
                "event": "exec",
                "pid": os.getpid(),
                "message": f"check passed; master {os.getpid()} re-execs on {code}",
            }
        )
        self.log.master(f"upgrade: re-exec in place on {code}")
        for c in self.conns.values():  # nothing left in our buffers: the new master has none
            c.flush_blocking(1.0)
            c.sock.setblocking(False)
        # A fresh snapshot, not the checked one: workers and clients may have moved
        # while the check ran in its subprocess.
        failure = upgrade.reexec(upgrade.snapshot(self, conn, code, simulate), code)
        signal.set_wakeup_fd(self.wake_w)  # only reached if exec failed
        self.log.master(f"upgrade: exec failed, still on the old code: {failure}")
        conn.send({"ok": False, "error": f"exec failed, nothing changed: {failure}"})

    def adopted(self, state: dict[str, Any]) -> None:
        """First thing a re-exec'd master does: watch the inherited fds, answer."""
        for fd, stream in self.streams.items():
            self.selector.register(
                fd, selectors.EVENT_READ, lambda mask, s=stream: self.read_stream(s)
            )
        for w in self.workers.values():
            if w.ready_pipe is not None:
                self.selector.register(
                    w.ready_pipe.fd, selectors.EVENT_READ, lambda mask, w=w: self.read_ready_pipe(w)
                )
        for conn in self.conns.values():
            self.selector.register(
                conn, selectors.EVENT_READ, lambda mask, c=conn: self.serve(c, mask)
            )
        pause = round(time.monotonic() - state["saved_at"], 3)
        requester, self.upgrade_requester = self.upgrade_requester, None
        if state["adopt_error"] is None:
            self.upgrades += 1
            text = f"upgraded in place: pid {os.getpid()}, code {upgrade.code_root()}"
            self.log.master(f"{text}, {len(self.workers)} workers adopted, exec took {pause}s")
            answer = {
                "ok": True,
                "pid": os.getpid(),
                "code": upgrade.code_root(),
                "workers": sorted(self.workers),
                "upgrades": self.upgrades,
                "seconds": pause,
            }
        else:
            error = (
                f"the new code in {state['code']['next']} could not adopt the master"
                f" ({state['adopt_error']}); back on the previous code {upgrade.code_root()},"
                " nothing changed"
            )
            self.log.master(f"upgrade failed: {error}")
            answer = {"ok": False, "error": error, "pid": os.getpid()}
        if requester is not None:
            requester.send(answer)
        self.systemd.send(
            READY=1, STATUS=f"upgrade {'ok' if answer['ok'] else 'failed'}", MAINPID=os.getpid()
        )

    # --- status ---

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = sorted(self.workers.values(), key=lambda w: (w.id, w.started_mono))
        state = "stopping" if self.stopping else "reloading" if self.job else "running"
        ready = sum(1 for w in workers if w.state == "ready")
        if not self.stopping and ready < self.target:
            state = "degraded" if self.announced else "starting"
        return {
            "pid": os.getpid(),
            "state": state,
            "listen": listener_mod.describe(self.listener),
            "listen_fds": self.cfg.listen_fds,
            "release": self.pinned.release,
            "generation": self.pinned.generation,
            "configured": self.target,
            "ready": ready,
            "ready_mode": str(self.cfg.ready),
            "started_at": iso(self.started),
            "rss": rss_bytes(os.getpid()),
            "reloads": self.counts["reloads"],
            "failed_reloads": self.counts["failed_reloads"],
            "crashes": self.counts["crashes"],
            "upgrades": self.upgrades,
            "reload": None
            if self.job is None
            else {"id": self.job.id, "reverting": self.job.reverting},
            "reload_queued": self.queued is not None,
            "last_reload": self.last_reload,
            "workers": [self.describe_worker(w, now) for w in workers],
            "crash_loops": [
                {
                    "id": s.id,
                    "crashes_in_a_row": s.crash_streak,
                    "restart_in": round(max(0.0, s.respawn_at - now), 1) if s.worker is None else 0,
                }
                for s in self.slots.values()
                if s.crash_streak >= 2
            ],
        }

    def describe_worker(self, w: Worker, now: float) -> dict[str, Any]:
        slot = self.slots.get(w.id)
        role = "replacement" if slot is not None and slot.replacement is w else "worker"
        return {
            "id": w.id,
            "pid": w.pid,
            "state": w.state,
            "role": role,
            "release": w.spec.release,
            "generation": w.spec.generation,
            "started_at": iso(w.started_at),
            "uptime": round(now - w.started_mono, 1),
            "restarts": slot.restarts if slot is not None else 0,
            "rss": w.rss_bytes(),
            "status": w.status_text or None,
        }


def backoff(streak: int) -> float:
    """0 for a first crash; then 0.5 s doubling, with +-20% jitter, capped at 30 s."""
    if streak <= 1:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (streak - 2) * random.uniform(0.8, 1.2))


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
