"""A rollout's log on the controller and the verdict line that ends it.

Every rollout writes one: a pushed one to `<deploy repo>/deployer/logs/<id>.log`
(the post-update hook follows it for the pusher), one run from a terminal to the
state dir's `logs/<id>.log`; either way `deployer logs [ID]` finds it in the state
dir's `logs/`. Its last line is the verdict, `deployer: verdict: ok (exit 0)` or
`deployer: verdict: FAILED (exit N): why`, which a pusher's CI can check in the push
output and which `deployer logs -f ID` turns back into its own exit code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TextIO

from deployer.hostapi.layout import release_name

VERDICT = "deployer: verdict: "
_VERDICT = re.compile(re.escape(VERDICT) + r"(?:ok|FAILED) \(exit (\d+)\)")
TAIL = 64 * 1024  # how much of a log's end is read for its verdict


def new_id(sha: str) -> str:
    """`<release name>-<4 digits>`: sorts by time, names the commit (hook.LOG_ID)."""
    return f"{release_name(sha)}-{os.getpid() % 10000:04d}"


def verdict_line(code: int, why: str = "") -> str:
    word = "ok" if code == 0 else "FAILED"
    return f"{VERDICT}{word} (exit {code})" + (f": {why}" if why and code else "")


def read_verdict(log: Path) -> int | None:
    """The exit code the log's last verdict line gives; None if it has none (the
    rollout still runs, or was killed before it could say)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = _VERDICT.findall(tail)
    return int(found[-1]) if found else None


def create(state: Path, deploy_id: str) -> tuple[Path, TextIO]:
    """A new log in the state dir's logs/, readable by this user alone."""
    from deployer.history import private_state
    from deployer.private import opener

    path = private_state(state, "logs") / f"{deploy_id}.log"
    return path, open(path, "x", encoding="utf-8", errors="replace", buffering=1, opener=opener)


QUIET = 10.0  # seconds: a log this long unwritten, with no rollout holding the lock, is over


def going_on(log: Path, state: Path, app: str) -> bool:
    """Whether the rollout writing `log` may still add to it: no verdict yet, and it
    holds the deploy lock or wrote lately (it may not have taken the lock yet)."""
    import time

    from deployer.lock import ControllerLock

    if read_verdict(log) is not None:
        return False
    try:
        recent = time.time() - log.stat().st_mtime < QUIET
    except OSError:
        return False
    holder = ControllerLock(state, app).holder()
    return recent or (holder is not None and holder.id == log.stem)
