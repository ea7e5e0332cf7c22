"""Deploy history on the controller: one JSON line per rollout, rollback or unlock."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_ENV = "DEPLOYER_STATE_DIR"


def state_dir(inventory_path: str) -> Path:
    """Where the controller keeps locks, history and logs: $DEPLOYER_STATE_DIR, or
    `.deployer/` beside the inventory (so two apps never share state by accident)."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    return Path(inventory_path).resolve().parent / ".deployer"


class History:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "history.jsonl"

    def append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write of one line in append mode: concurrent writers never interleave.
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")

    def entries(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in reversed(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line from a crash must not hide the rest
            if limit is not None and len(out) >= limit:
                break
        return out
