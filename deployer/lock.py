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
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployer.errors import LockHeld

STALE_AFTER_S = 120.0  # a heartbeat older than this means the holder is gone


@dataclass(frozen=True)
class Owner:
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


def describe(holder: dict[str, Any], where: str) -> str:
    """'alice@build1 (pid 42) since 2026-...: rollout abc1234 [stale: ...]'."""
    if not holder:
        return f"{where}: held (owner unknown)"
    text = (
        f"{where}: held by {holder.get('user')}@{holder.get('controller')} "
        f"(pid {holder.get('pid')}) since {holder.get('since')}: "
        f"{holder.get('action', 'rollout')} of {str(holder.get('revision', ''))[:12]}"
    )
    why = stale_reason(holder)
    if why:
        text += f" [stale: {why}; break it with `deployer unlock`]"
    return text


def stale_reason(holder: dict[str, Any]) -> str | None:
    """Why the holder is provably gone, or None if it may still be alive."""
    if holder.get("controller") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"pid {holder['pid']} is not running on {holder['controller']}"
        except PermissionError:
            pass
    beat = holder.get("heartbeat")
    if isinstance(beat, int | float) and time.time() - beat > STALE_AFTER_S:
        return f"no heartbeat for {time.time() - beat:.0f}s"
    return None


class ControllerLock:
    """<state dir>/<app>.lock, created with O_EXCL."""

    def __init__(self, state_dir: Path, app: str) -> None:
        self.path = state_dir / f"{app}.lock"

    def holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
            data["heartbeat"] = self.path.stat().st_mtime
            return data
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self, owner: Owner, wait: float = 0.0) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        end = time.monotonic() + wait
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released between our open and our read: try again
                if time.monotonic() >= end:
                    raise LockHeld(describe(holder, f"deploy lock {self.path}")) from None
                time.sleep(min(1.0, max(0.05, end - time.monotonic())))
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(owner.to_dict(), fh)
            return

    def heartbeat(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)

    def release(self, owner: Owner) -> None:
        holder = self.holder()
        if holder is not None and holder.get("id") == owner.id:
            self.path.unlink(missing_ok=True)

    def force_release(self) -> dict[str, Any] | None:
        holder = self.holder()
        self.path.unlink(missing_ok=True)
        return holder


def break_locks(deploy: Any, force: bool) -> list[str]:
    """Break the controller lock and host locks whose holder is gone (or any, with force).

    `deploy` is a rollout.Deploy. Who broke whose lock goes into the history.
    """
    app = deploy.inventory.app.name
    controller = ControllerLock(deploy.state_dir, app)
    said: list[str] = []
    alive: list[str] = []
    holder = controller.holder()
    if holder is not None:
        if stale_reason(holder) or force:
            controller.force_release()
            said.append("broke " + describe(holder, f"deploy lock {controller.path}"))
        else:
            alive.append(describe(holder, f"deploy lock {controller.path}"))
    breaker = Owner(app, "", "unlock").to_dict()
    results, _ = deploy.each(list(deploy.remotes), lambda r: r.lock("show", breaker))
    for name, res in results.items():
        h = res.get("holder")
        if not h:
            continue
        if stale_reason(h) or force:
            deploy.remotes[name].lock("release", {**breaker, "force": True})
            said.append("broke " + describe(h, f"host {name}"))
        else:
            alive.append(describe(h, f"host {name}"))
    if said:
        deploy.history.append({**breaker, "action": "unlock", "broke": said, "result": "ok"})
    if alive:
        raise LockHeld("\n".join(alive) + "\n(the holder looks alive; use --force to break it)")
    return said or ["no lock held"]
