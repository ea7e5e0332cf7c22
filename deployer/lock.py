"""The deploy lock: one rollout per app at a time.

Two layers, both taken atomically (no check-then-write): a file created with
O_EXCL on the controller, and a directory made with mkdir on every host (so two
controllers on different machines also exclude each other). Each records who,
what, where and since when; a heartbeat shows it is alive.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployer.errors import DeployerError, LockHeld, StepFailed
from deployer.history import private_state
from deployer.hostapi import calls
from deployer.hostapi.answers import LockOwner
from deployer.hostapi.calls import AgentCall
from deployer.private import FILE_MODE

if TYPE_CHECKING:
    from deployer.session import FleetSession

STALE_AFTER_S = 120.0  # a heartbeat older than this means the holder is gone
HEARTBEAT_S = 10.0


@dataclass(frozen=True)
class Owner:
    """Who takes a lock: this process, for one action of one app."""

    app: str
    revision: str
    action: str = "rollout"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    user: str = field(default_factory=getpass.getuser)
    controller: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    since: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def wire(self) -> LockOwner:
        """As the host contract carries it."""
        return LockOwner(**self.to_dict())


def describe(holder: LockOwner | None, where: str, hint: bool = True) -> str:
    """'alice@build1 (pid 42) since 2026-...: rollout abc1234 [stale: ...]'."""
    if holder is None or not holder.id:
        return f"{where}: held (owner unknown)"
    text = (
        f"{where}: held by {holder.user}@{holder.controller} "
        f"(pid {holder.pid}) since {holder.since}: "
        f"{holder.action} of {holder.revision[:12]}"
    )
    why = stale_reason(holder)
    if why:
        text += f" [stale: {why}" + ("; break it with `deployer unlock`]" if hint else "]")
    return text


def stale_reason(holder: LockOwner) -> str | None:
    """Why the holder is provably gone, or None if it may still be alive."""
    if holder.controller == socket.gethostname() and isinstance(holder.pid, int):
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return f"pid {holder.pid} is not running on {holder.controller}"
        except PermissionError:
            pass
    beat = holder.heartbeat
    if isinstance(beat, (int, float)) and time.time() - beat > STALE_AFTER_S:
        return f"no heartbeat for {time.time() - beat:.0f}s"
    return None


class ControllerLock:
    """<state dir>/<app>.lock, created with O_EXCL."""

    def __init__(self, state_dir: Path, app: str) -> None:
        self.path = state_dir / f"{app}.lock"

    def holder(self) -> LockOwner | None:
        """None if free; a holder of unknown identity if the file is unreadable."""
        try:
            data = json.loads(self.path.read_text())
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return LockOwner("")
        return (LockOwner.from_json(data) or LockOwner(""))._replace(heartbeat=mtime)

    def acquire(self, owner: Owner, wait: float = 0.0) -> LockOwner | None:
        """Take the lock, waiting up to `wait`; a holder that is provably gone (see
        stale_reason) is replaced, and returned so that the caller can say so."""
        private_state(self.path.parent)
        end = time.monotonic() + wait
        replaced = None
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released between our open and our read: try again
                if stale_reason(holder) and self._move_aside(holder):
                    replaced = holder
                    continue
                if time.monotonic() >= end:
                    raise LockHeld(describe(holder, f"deploy lock {self.path}")) from None
                time.sleep(min(1.0, max(0.05, end - time.monotonic())))
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(owner.to_dict(), fh)
            return replaced

    def _move_aside(self, stale: LockOwner) -> bool:
        """Remove the stale lock, unless another taker replaced it meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except OSError:
            return False
        try:
            moved = LockOwner.from_json(json.loads(aside.read_text()))
        except (OSError, ValueError):
            moved = None
        if moved is not None and moved.id and moved.id != stale.id:
            with contextlib.suppress(OSError):
                os.rename(aside, self.path)  # a live lock: give it back
            return False
        aside.unlink(missing_ok=True)
        return True

    def heartbeat(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)

    def release(self, owner: Owner) -> None:
        holder = self.holder()
        if holder is not None and holder.id == owner.id:
            self.path.unlink(missing_ok=True)

    def force_release(self) -> LockOwner | None:
        holder = self.holder()
        self.path.unlink(missing_ok=True)
        return holder


class FleetLocks:
    """The controller lock and a lock on every host of a fleet session, with a
    heartbeat; released on every exit of the `with` block."""

    def __init__(self, fleet: FleetSession, owner: Owner, then: AgentCall | None = None) -> None:
        """`then`: an agent call sent to each host right behind its lock, in the same
        round trip (a rollout's state); the host's next call with it reads its answer."""
        self.fleet = fleet
        self.owner = owner
        self.then = then
        self.wire = owner.wire()
        self.controller = ControllerLock(fleet.state_dir, owner.app)
        self.held: list[str] = []
        self.interrupted: set[str] = set()  # deploys whose stale locks we took over
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> FleetLocks:
        replaced = self.controller.acquire(self.owner, wait=self.fleet.lock_wait)
        self.fleet.run.locks = self
        if replaced is not None:
            self._took_over(replaced, f"deploy lock {self.controller.path}")
        try:
            self._acquire_hosts()
        except BaseException:
            self._release()
            raise
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat")
        self._beat.start()
        return self

    def _acquire_hosts(self) -> None:
        acquire, then = calls.lock("acquire", self.wire, take_stale=STALE_AFTER_S), self.then

        def take(r: Any) -> Any:
            pipelined = getattr(r, "_call_then", None)  # a RemoteHost (tests use fakes)
            if then is not None and pipelined is not None:
                return pipelined(acquire, then)
            return r.lock("acquire", self.wire, take_stale=STALE_AFTER_S)

        results, failures = self.fleet.each(self.fleet.names, take)
        # held by a process this controller knows is gone: take those over by its id
        dead = {
            n: a.holder.id
            for n, a in results.items()
            if not a.done and a.holder is not None and a.holder.id and stale_reason(a.holder)
        }
        if dead:
            again, more = self.fleet.each(
                list(dead), lambda r: r.lock("acquire", self.wire, replace=dead[r.name])
            )
            results.update(again)
            failures.update(more)
        self.held = [n for n, answer in results.items() if answer.done]
        for n, answer in results.items():
            if answer.done and answer.holder is not None:
                self._took_over(answer.holder, f"host {n}")
        busy = {n: answer.holder for n, answer in results.items() if not answer.done}
        if busy:
            name, holder = next(iter(busy.items()))
            raise LockHeld(describe(holder, f"host {name}"))
        if failures:
            raise self.fleet.first_error(failures)

    def _took_over(self, holder: LockOwner, where: str) -> None:
        """A lock whose holder is gone (killed, its machine lost): ours now. Its
        deploy never finished: the history says so, once."""
        self.fleet.reporter.say(f"took over the stale lock: {describe(holder, where, hint=False)}")
        if holder.id and holder.id not in self.interrupted and self._unfinished(holder.id):
            self.interrupted.add(holder.id)
            self.fleet.history.append(
                {
                    **holder.to_json(),
                    "result": "interrupted",
                    "note": f"its lock went stale and was taken over by {self.owner.id}",
                }
            )

    def _unfinished(self, deploy_id: str) -> bool:
        """No final record: the deploy was killed (a failed one that could not release
        a lost host's lock has recorded its end already)."""
        last = next((e for e in self.fleet.history.entries() if e["id"] == deploy_id), None)
        return last is None or last.get("result") == "running"

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.controller.heartbeat()
            for name in self.held:
                # Quietly: a host that is down is reported by the step that needs it.
                with contextlib.suppress(DeployerError):
                    self.fleet.remotes[name].lock("heartbeat", self.wire)

    def release_call(self) -> AgentCall:
        """The call that releases a host's lock (record sends it ahead: one round trip)."""
        return calls.lock("release", self.wire)

    def _release(self) -> None:
        self._stop.set()
        if self.fleet.run.locks is self:
            self.fleet.run.locks = None
        if self.held:
            _, left = self.fleet.each(self.held, lambda r: r.lock("release", self.wire))
            for name in left:
                self.fleet.reporter.say(
                    "deploy lock left behind on this host; the next rollout takes it "
                    "over (its holder is gone), or `deployer unlock`",
                    name,
                )
        self.controller.release(self.owner)

    def __exit__(self, *exc: object) -> None:
        self._release()


def break_locks(fleet: FleetSession, force: bool) -> list[str]:
    """Break the controller lock and host locks whose holder is gone (or any, with force).

    Who broke whose lock goes into the history.
    """
    private_state(fleet.state_dir)  # where that history goes: refused before any lock is broken
    app = fleet.inventory.app.name
    controller = ControllerLock(fleet.state_dir, app)
    said: list[str] = []
    alive: list[str] = []
    holder = controller.holder()
    if holder is not None:
        if stale_reason(holder) or force:
            controller.force_release()
            said.append("broke " + describe(holder, f"deploy lock {controller.path}", hint=False))
        else:
            alive.append(describe(holder, f"deploy lock {controller.path}"))
    breaker = Owner(app, "", "unlock")
    results, unreachable = fleet.each(fleet.names, lambda r: r.lock("show", breaker.wire()))
    for name, answer in results.items():
        h = answer.holder
        if h is None:
            continue
        if stale_reason(h) or force:
            fleet.remotes[name].lock("release", breaker.wire(), force=True)
            said.append("broke " + describe(h, f"host {name}", hint=False))
        else:
            alive.append(describe(h, f"host {name}"))
    if said:
        fleet.history.append(
            {**breaker.to_dict(), "action": "unlock", "broke": said, "result": "ok"}
        )
    if alive:
        raise LockHeld("\n".join(alive) + "\n(the holder looks alive; use --force to break it)")
    if unreachable:
        for line in said:
            fleet.reporter.say(line)
        # the hosts were named above, each with its reason; a lock there may still be held
        raise StepFailed(", ".join(unreachable), "unlock", "locks on these hosts were not checked")
    return said or ["no lock held"]
