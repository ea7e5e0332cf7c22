"""Deploy history on the controller: one JSON line per rollout, rollback or unlock."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployer.errors import DeployerError
from deployer.private import opener, private_dir

STATE_ENV = "DEPLOYER_STATE_DIR"
SHOWN_BAD_LINES = 10  # a warning names this many bad line numbers, then counts the rest


def state_dir(inventory_path: str, destination: str | None = None) -> Path:
    """Where the controller keeps locks, history and logs: $DEPLOYER_STATE_DIR, or
    `.deployer/` beside the inventory (so two apps never share state by accident);
    a destination (`-d staging`) has its own below it, `destinations/<name>/`, so
    staging and production never share a lock, a history or a log index."""
    env = os.environ.get(STATE_ENV)
    base = Path(env) if env else Path(inventory_path).resolve().parent / ".deployer"
    return base / "destinations" / destination if destination else base


def private_state(state: Path, *below: str) -> Path:
    """`state` (a state_dir()) and `below` it, made or checked as private.private_dir:
    mode 0700, a symlink or another user's directory refused. A destination's
    directory is checked from the base down: a link at `.deployer` is one too."""
    top = state.parent.parent if state.parent.name == "destinations" else state
    fix = f"move it away, or set ${STATE_ENV}"
    path = private_dir(top, fix)
    for part in (*state.relative_to(top).parts, *below):
        path = private_dir(path / part, fix)
    return path


# --- what a record may hold ------------------------------------------------------------
# The file is ours, but anyone (or a crash, or a full disk) may have written to it:
# every field a reader uses is checked, so a bad record is skipped, never a traceback
# in `deployer history` or the hook's summary line.


def _text(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _number(v: Any) -> bool:
    real = isinstance(v, int | float) and not isinstance(v, bool)
    return v is None or (real and math.isfinite(v))


def _texts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _text_map(v: Any) -> bool:
    return isinstance(v, dict) and all(_text(x) for x in v.values())


TEXT_FIELDS = (
    "app", "revision", "release", "user", "controller", "started", "since",
    "result", "failed_step", "note", "log", "performer",
)  # fmt: skip
FIELDS: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(TEXT_FIELDS, _text),
    "id": lambda v: isinstance(v, str),
    "action": lambda v: isinstance(v, str),
    "pid": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "duration_s": _number,
    "hosts": _texts,
    "broke": _texts,
    "failures": _text_map,
    "releases": _text_map,
}
REQUIRED = ("id", "action")


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """One line as a record, or None if it is not one (not UTF-8, not JSON, not an
    object, a field of the wrong type)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(record, dict) or not all(k in record for k in REQUIRED):
        return None
    if not all(check(record[k]) for k, check in FIELDS.items() if k in record):
        return None
    return record


@dataclass
class Entries:
    """What a read found: the good records (newest first) and the numbers of bad lines."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)

    def warning(self) -> str | None:
        """One line naming the file and its bad lines; None if there were none."""
        if not self.bad_lines:
            return None
        bad = sorted(self.bad_lines)
        shown = ", ".join(map(str, bad[:SHOWN_BAD_LINES]))
        more = len(bad) - SHOWN_BAD_LINES
        shown += f" and {more} more" if more > 0 else ""
        return (
            f"warning: {self.path}: skipped {len(bad)} unreadable record(s), "
            f"line{'s' if len(bad) > 1 else ''} {shown}"
        )


class History:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "history.jsonl"

    def append(self, entry: dict[str, Any]) -> None:
        private_state(self.path.parent)
        # One write of one line in append mode: concurrent writers never interleave.
        try:
            with open(self.path, "a", opener=opener) as fh:
                fh.write(json.dumps(entry, sort_keys=True) + "\n")
        except OSError as e:
            raise DeployerError(
                f"{self.path}: cannot write the deploy history: {e.strerror}"
            ) from None

    def read(self, limit: int | None = None) -> Entries:
        """The newest `limit` good records, one per deploy id (a deploy writes one when
        it starts and one when it ends: the last one says how it went); bad lines
        among those read are reported, not fatal (a torn last line from a crash
        must not hide the rest)."""
        seen: set[str] = set()
        found = Entries(self.path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return found
        except OSError as e:
            raise DeployerError(f"{self.path}: cannot read the deploy history: {e}") from None
        lines = data.split(b"\n")
        for number in range(len(lines), 0, -1):
            raw = lines[number - 1]
            if not raw.strip():
                continue
            record = parse_record(raw)
            if record is None:
                found.bad_lines.append(number)
                continue
            if record["id"] in seen:
                continue
            seen.add(record["id"])
            found.records.append(record)
            if limit is not None and len(found.records) >= limit:
                break
        return found

    def entries(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first; bad records skipped."""
        return self.read(limit).records
