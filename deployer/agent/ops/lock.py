"""The host's deploy lock: a directory, because mkdir is atomic."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from deployer.agent.ops.common import AgentError
from deployer.hostapi import answers
from deployer.hostapi.layout import Layout


def lock(
    layout: Layout,
    action: str,
    owner: answers.LockOwner,
    force: bool = False,
    take_stale: float | None = None,
    replace: str | None = None,
) -> answers.LockAnswer:
    """The host's deploy lock: a directory, because mkdir is atomic. Acquire also
    takes over a lock whose holder is gone: whose heartbeat is older than
    `take_stale` seconds, or held by `replace` (an id the controller knows is dead);
    the answer then names the holder it replaced."""
    info = layout.lock / "owner.json"
    if action == "acquire":
        layout.run.mkdir(parents=True, exist_ok=True)
        replaced = None
        try:
            layout.lock.mkdir()
        except FileExistsError:
            holder = _read_owner(info)
            if holder is not None and holder.id == owner.id:  # a retried call: ours already
                return answers.LockAnswer(True, None)
            gone = replace is not None and holder is not None and holder.id == replace
            if not gone and (take_stale is None or not _stale(layout, holder, take_stale)):
                return answers.LockAnswer(False, holder)
            if not _take_over(layout, holder):
                return answers.LockAnswer(False, _read_owner(info))
            replaced = holder
        info.write_text(json.dumps(owner.to_json()))
        return answers.LockAnswer(True, replaced)
    holder = _read_owner(info)
    mine = holder is not None and holder.id == owner.id
    if action == "heartbeat":
        if mine:
            os.utime(info)
        return answers.LockAnswer(mine, holder)
    if action == "release":
        if mine or (force and holder is not None):
            shutil.rmtree(layout.lock, ignore_errors=True)
            return answers.LockAnswer(True, holder)
        return answers.LockAnswer(False, holder)
    if action == "show":
        return answers.LockAnswer(False, holder)
    raise AgentError(f"unknown lock action {action!r}")


def _stale(layout: Layout, holder: answers.LockOwner | None, after: float) -> bool:
    beat = holder.heartbeat if holder is not None else None
    if beat is None:  # no readable owner file: the directory's own age
        try:
            beat = layout.lock.stat().st_mtime
        except OSError:
            return False
    return time.time() - beat > after


def _take_over(layout: Layout, stale: answers.LockOwner | None) -> bool:
    """Move the stale lock aside and take the place: mkdir decides between racers.
    If what was moved is not the stale lock (another taker was faster), put it back."""
    aside = layout.run / f".deploy.lock.stale-{os.getpid()}"
    try:
        os.rename(layout.lock, aside)
    except OSError:
        return False
    moved = _read_owner(aside / "owner.json")
    if stale is not None and moved is not None and moved.id != stale.id:
        with contextlib.suppress(OSError):
            os.rename(aside, layout.lock)
        return False
    shutil.rmtree(aside, ignore_errors=True)
    try:
        layout.lock.mkdir()
    except FileExistsError:
        return False
    return True


def _read_owner(path: Path) -> answers.LockOwner | None:
    """The holder; None if the lock is not held; one of unknown identity if its
    owner file is unreadable (a crash between mkdir and the write)."""
    if not path.parent.is_dir():
        return None
    try:
        holder = answers.LockOwner.from_json(json.loads(path.read_text()))
        return (holder or answers.LockOwner(""))._replace(heartbeat=path.stat().st_mtime)
    except (OSError, ValueError, TypeError):
        return answers.LockOwner("")
