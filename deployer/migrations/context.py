"""`db`, the object a .py migration's up(db) and down(db) receive."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from deployer.migrations.database import Database

_IDENTIFIER = re.compile(r'^(?:[A-Za-z_][\w$]*|"[^"]+")(?:\.(?:[A-Za-z_][\w$]*|"[^"]+"))?$')


class MigrationDB:
    """SQL with `?` placeholders on both engines, and keyset chunks for backfills.

    A backfill's up(db) yields after each chunk; the runner then commits the
    chunk together with the yielded value as progress. `db.progress` is the
    last committed value (None on a first run), and `db.batches()` starts
    after it, so a resumed run continues exactly where the last commit left.
    """

    def __init__(self, database: Database, progress: Any = None) -> None:
        self._db = database
        self.dialect = database.dialect  # "sqlite" | "postgresql"
        self.progress = progress
        self.last_statement: str | None = None
        self.last_batch_end: Any = None  # progress to record when a chunk yields None

    @property
    def connection(self) -> Any:
        """The DB-API connection (sqlite3 or psycopg), for what this class does not cover."""
        return self._db.raw

    def execute(self, sql: str, params: tuple | list | None = None) -> Any:
        """Run one statement; returns the cursor (fetchone/fetchall/rowcount)."""
        self.last_statement = sql
        return self._db.execute(sql, params)

    def query(self, sql: str, params: tuple | list | None = None) -> list[tuple]:
        return list(self.execute(sql, params).fetchall())

    def scalar(self, sql: str, params: tuple | list | None = None) -> Any:
        row = self.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def batches(
        self, table: str, key: str = "id", size: int = 1000, where: str | None = None
    ) -> Iterator[tuple[Any, Any]]:
        """(first, last) key of each chunk of `size` rows, in key order, after db.progress.

        Use them as `WHERE key BETWEEN ? AND ?`. `where` (SQL) restricts which
        rows count toward a chunk, e.g. "name IS NULL".
        """
        for ident in (table, key):
            if not _IDENTIFIER.match(ident):
                raise ValueError(f"db.batches: {ident!r} is not a plain table or column name")
        if size < 1:
            raise ValueError("db.batches: size must be at least 1")
        cursor = self.progress
        while True:
            conditions = [c for c in (where, None if cursor is None else f"{key} > ?") if c]
            clause = f" WHERE {' AND '.join(f'({c})' for c in conditions)}" if conditions else ""
            params = ([] if cursor is None else [cursor]) + [size]
            sql = (
                f"SELECT MIN(k), MAX(k) FROM (SELECT {key} AS k FROM {table}{clause}"
                f" ORDER BY {key} LIMIT ?) chunk"
            )
            first, last = self.query(sql, params)[0]
            if first is None:
                return
            self.last_batch_end = last
            yield first, last
            cursor = last
