"""Slots: the numbered places (1..workers) workers serve in.

A slot holds its serving (or starting) worker and, during a reload, that
worker's replacement. It also counts the worker's crashes: a worker that
crashes again soon after a restart is in a crash loop, and its next restart
waits (exponential backoff with jitter).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from deployer.master.worker import Worker

BACKOFF_BASE = 0.5  # seconds before the 2nd restart in a crash loop; doubles after
BACKOFF_CAP = 30.0
STABLE_AFTER = 10.0  # a worker up this long after being ready ends a crash loop


@dataclass
class Slot:
    id: int
    worker: Worker | None = None  # the slot's serving (or starting) worker
    replacement: Worker | None = None  # a reload's candidate for this slot
    restarts: int = 0
    crash_streak: int = 0
    respawn_at: float = 0.0  # crash backoff: no spawn before this (monotonic)

    def crashed(self, worker: Worker, now: float) -> float:
        """Count the crash of the slot's worker; the delay before its restart."""
        self.restarts += 1
        self.crash_streak = 1 if stable(worker, now) else self.crash_streak + 1
        delay = backoff(self.crash_streak)
        self.respawn_at = now + delay
        return delay

    def to_state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "restarts": self.restarts,
            "crash_streak": self.crash_streak,
            "respawn_at": self.respawn_at,
            "worker": self.worker.pid if self.worker else None,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any], workers: dict[int, Worker]) -> Slot:
        return cls(
            d["id"],
            worker=workers[d["worker"]] if d["worker"] else None,
            restarts=d["restarts"],
            crash_streak=d["crash_streak"],
            respawn_at=d["respawn_at"],
        )


def stable(worker: Worker, now: float) -> bool:
    """Up long enough after being ready that a crash now does not continue a loop."""
    return worker.ready_at is not None and now - worker.ready_at >= STABLE_AFTER


def backoff(streak: int) -> float:
    """0 for a first crash; then 0.5 s doubling, with +-20% jitter, capped at 30 s."""
    if streak <= 1:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (streak - 2) * random.uniform(0.8, 1.2))
