"""The deployer_migrations table: what ran, when, from which file, how far.

One row per migration. `applied_at` is NULL while a chunked backfill is part
way through; `progress` then holds the last committed chunk (JSON), written in
the same transaction as that chunk's data, so a resume is exact. Timestamps
are ISO-8601 UTC text so the same DDL works on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from deployer.migrations.database import Database

TABLE = "deployer_migrations"

CREATE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    name TEXT PRIMARY KEY,
    phase TEXT NOT NULL,
    checksum TEXT NOT NULL,
    batch INTEGER NOT NULL,
    applied_at TEXT,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    progress TEXT,
    release TEXT,
    started_at TEXT NOT NULL
)"""
COLUMNS = "name, phase, checksum, batch, applied_at, duration_ms, progress, release, started_at"


@dataclass
class Row:
    name: str
    phase: str
    checksum: str
    batch: int
    applied_at: str | None
    duration_ms: int
    progress: str | None  # JSON: {"chunks": n, "value": last yielded value}
    release: str | None
    started_at: str

    @property
    def done(self) -> bool:
        return self.applied_at is not None

    @property
    def progress_data(self) -> dict[str, Any] | None:
        return json.loads(self.progress) if self.progress else None


def ensure_table(db: Database) -> None:
    db.execute(CREATE)


def read_rows(db: Database) -> dict[str, Row]:
    if not db.table_exists(TABLE):
        return {}
    rows = db.query(f"SELECT {COLUMNS} FROM {TABLE}")
    return {r[0]: Row(*r) for r in rows}


def applied_order(rows: dict[str, Row]) -> list[Row]:
    """Oldest first: by batch, then by the time each one started, then name."""
    return sorted(rows.values(), key=lambda r: (r.batch, r.started_at, r.name))


def next_batch(db: Database) -> int:
    return int(db.query(f"SELECT COALESCE(MAX(batch), 0) + 1 FROM {TABLE}")[0][0])


def save(db: Database, row: Row) -> None:
    """Insert or update a row (inside the caller's transaction)."""
    values = asdict(row)
    updates = ", ".join(f"{k} = excluded.{k}" for k in values if k != "name")
    db.execute(
        f"INSERT INTO {TABLE} ({COLUMNS}) VALUES ({', '.join('?' * len(values))})"
        f" ON CONFLICT (name) DO UPDATE SET {updates}",
        tuple(values.values()),
    )


def delete(db: Database, name: str) -> None:
    db.execute(f"DELETE FROM {TABLE} WHERE name = ?", (name,))


def set_checksum(db: Database, name: str, checksum: str) -> None:
    db.execute(f"UPDATE {TABLE} SET checksum = ? WHERE name = ?", (checksum, name))
