"""Reload: replace every worker with one from the release `current` points to
at reload time, slot by slot, never dropping below `workers` ready workers.

A reload is a ReloadJob. At most one runs; one more may be queued behind it
(every request that comes meanwhile joins the queued one). Each pass of the
arbiter's loop steps the running job:

    started    the target release is resolved, the generation bumped
    spawned    up to reload_batch replacements boot at a time, next to the
               slots' workers
    ready      a replacement said it is ready; once it has stayed up for
               ready_soak it is promoted and the old worker drains
    stopped    a drained worker is gone
    ok         every slot converted: the target becomes the pinned release

A replacement that exits or is not ready in time aborts the job: the new
release's candidates are killed, and the slots already converted are
converted back to the previous release (up to REVERT_ATTEMPTS tries each).
The pinned release stays what it was, and the subscribers are told why.

`Reloads` is a mixin of the Arbiter: it steps the job on the arbiter's
slots, spawning and retiring workers with the arbiter's own methods.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from deployer.hostapi import checks
from deployer.master.control import Connection
from deployer.master.slots import Slot
from deployer.master.worker import Spec, Worker

REVERT_ATTEMPTS = 3  # tries per slot to go back to the pinned release after a failed reload


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
        """What this job spawns now: the target, or the previous release when reverting."""
        spec = self.previous if self.reverting else self.target
        assert spec is not None
        return spec

    def subscribe(self, conn: Connection | None) -> None:
        if conn is not None:
            self.subscribers.append(conn)

    def unsubscribe(self, conn: Connection) -> None:
        if conn in self.subscribers:
            self.subscribers.remove(conn)

    def broadcast(self, message: dict[str, Any]) -> None:
        for conn in self.subscribers:
            conn.send(message)

    def emit(self, event: str, w: Worker, **extra: Any) -> None:
        """A progress event about one worker."""
        message = {
            "event": event,
            "reload": self.id,
            "worker": w.id,
            "pid": w.pid,
            "release": w.spec.release,
            **extra,
        }
        if self.reverting:
            message["phase"] = "revert"
        self.broadcast(message)


class Reloads:
    """Arbiter mixin: the reload state machine."""

    job: ReloadJob | None  # the running reload
    queued: ReloadJob | None  # the next one: every request meanwhile joins it
    job_ids: int
    last_reload: dict[str, Any] | None  # what the last job that ended answered

    # --- requests ---

    def request_reload(self, conn: Connection | None) -> None:
        if self.stopping:
            if conn is not None:
                conn.send({"ok": False, "error": "the master is stopping"})
            return
        if self.job is None:
            self.job = self.new_job()
            self.job.subscribe(conn)
            self.start_reload(self.job)
            return
        if self.queued is None:
            self.queued = self.new_job()
        self.queued.subscribe(conn)
        if conn is not None:
            conn.send({"event": "queued", "reload": self.queued.id, "behind": self.job.id})

    def new_job(self) -> ReloadJob:
        self.job_ids += 1
        return ReloadJob(self.job_ids)

    def reload_jobs(self) -> list[ReloadJob]:
        """The running job and the queued one, those that exist."""
        return [job for job in (self.job, self.queued) if job is not None]

    def unsubscribe(self, conn: Connection) -> None:
        """A client went away: stop sending it progress."""
        for job in self.reload_jobs():
            job.unsubscribe(conn)

    def cancel_reloads(self, error: str) -> None:
        """The master is stopping: every job ends now, unfinished."""
        for job in self.reload_jobs():
            job.broadcast({"ok": False, "reload": job.id, "error": error})
        self.job = self.queued = None

    # --- the running job ---

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
        job.broadcast(
            {
                "event": "started",
                "reload": job.id,
                "release": release,
                "from": job.previous.release,
            }
        )
        if not os.path.isdir(release):
            job.error = f"release directory {release} does not exist"
            job.queue = []

    def step_reload(self, job: ReloadJob, now: float) -> None:
        in_flight = [s for s in self.slots.values() if s.replacement is not None]
        if not self.boot_replacements(job, in_flight):
            return
        for slot in in_flight:
            if self.soaked(slot.replacement, now):
                self.promote(job, slot, now)
        if not job.queue and not in_flight and not job.draining:
            self.finish_reload(job)

    def boot_replacements(self, job: ReloadJob, in_flight: list[Slot]) -> bool:
        """Spawn the next slots' replacements; False if a fork failed (the job aborts).

        Up to reload_batch replacements boot at a time, and the next batch may
        boot while the previous one soaks (so soaks overlap instead of adding
        up): at most 2 x reload_batch candidates exist at once. Old workers are
        still stopped only once their own replacement is ready and soaked.
        """
        batch = checks.share_of(self.cfg.reload_batch, len(self.slots))
        booting = sum(1 for s in in_flight if s.replacement and s.replacement.ready_at is None)
        while booting < batch and len(in_flight) < 2 * batch and job.queue:
            slot = self.slots.get(job.queue.pop(0))
            if slot is None or (slot.worker is not None and slot.worker.spec == job.spec):
                continue
            slot.replacement = self.spawn(slot, job.spec)
            if slot.replacement is None:
                self.replacement_failed(slot, None, "could not be started (fork failed)")
                return False
            job.emit("spawned", slot.replacement)
            in_flight.append(slot)
            booting += 1
        return True

    def soaked(self, w: Worker | None, now: float) -> bool:
        """Ready, and has stayed up for ready_soak since."""
        if w is None or w.ready_at is None or w.state != "ready":
            return False
        return now - w.ready_at >= self.cfg.ready_soak

    def promote(self, job: ReloadJob, slot: Slot, now: float) -> None:
        old, slot.worker, slot.replacement = slot.worker, slot.replacement, None
        slot.crash_streak = 0
        if old is not None:
            self.retire(old, now)
            job.draining.add(old.pid)
            job.emit("draining", old)

    def drained(self, worker: Worker, how: str) -> None:
        """A draining worker is gone; the job that retired it reports it."""
        job = self.job
        if job is not None and worker.pid in job.draining:
            job.draining.discard(worker.pid)
            job.emit("stopped", worker, status=how)

    # --- failures ---

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

    def crashed_during_reload(self, worker: Worker, how: str) -> None:
        """A promoted worker of the new release crashed: the release is bad."""
        job = self.job
        if job is not None and not job.reverting and worker.spec == job.target:
            self.abort_reload(job, f"{worker.label} of the new release {how}", worker)

    def abort_reload(self, job: ReloadJob, error: str, failed: Worker | None) -> None:
        """Drain the new release's other candidates and convert converted slots back.
        Drain, not kill: a candidate that is up already serves connections from the
        shared queue (SIGKILL reset them); shutdown_timeout still bounds it."""
        job.error = error
        job.reverting = True
        for slot in self.slots.values():
            w = slot.replacement
            if w is not None and w is not failed:
                slot.replacement = None
                self.retire(w)
                job.draining.add(w.pid)
        assert job.target is not None
        job.queue = [s.id for s in self.slots.values() if s.worker and s.worker.spec == job.target]
        job.broadcast(
            {"event": "aborting", "reload": job.id, "error": error, "reverting": job.queue}
        )

    # --- the end ---

    def finish_reload(self, job: ReloadJob) -> None:
        seconds = round(time.monotonic() - job.started, 3)
        result = (
            self.reload_done(job, seconds)
            if job.error is None
            else self.reload_failed(job, seconds)
        )
        self.last_reload = dict(result)
        self.systemd.send(
            READY=1,
            STATUS=f"reload {job.id} {'ok' if result['ok'] else 'failed'}: {self.pinned.release}",
        )
        job.broadcast(result)
        self.job, self.queued = self.queued, None
        if self.job is not None:
            self.start_reload(self.job)

    def reload_done(self, job: ReloadJob, seconds: float) -> dict[str, Any]:
        assert job.target is not None
        self.pinned = job.target
        self.counts["reloads"] += 1
        self.log.master(f"reload {job.id} done in {seconds}s: release {job.target.release}")
        return {"ok": True, "reload": job.id, "release": job.target.release, "seconds": seconds}

    def reload_failed(self, job: ReloadJob, seconds: float) -> dict[str, Any]:
        self.counts["failed_reloads"] += 1
        error = job.error or ""
        if job.unreverted:
            error += (
                f" (slots {job.unreverted} could not be reverted and still run the new release)"
            )
        self.log.master(
            f"reload {job.id} failed after {seconds}s; release stays {self.pinned.release}"
        )
        return {
            "ok": False,
            "reload": job.id,
            "error": error,
            "seconds": seconds,
            "release": self.pinned.release,
        }
