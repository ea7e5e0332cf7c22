"""Database URLs and the two engines behind one small interface.

Both connections run in autocommit mode and the runner issues BEGIN/COMMIT
itself: the same code then handles transactional migrations, chunked
backfills (a commit per chunk) and `-- transaction: none` statements.
Placeholders are `?` everywhere; PostgreSQL statements are translated.

Locks (one runner per database):
- PostgreSQL: a session advisory lock, released by the server if the runner
  dies; the holder is found in pg_locks/pg_stat_activity.
- SQLite: a row in deployer_migrations_lock written in a BEGIN IMMEDIATE
  transaction, with owner, pid and time; a row whose process is gone (same
  host) is taken over, so a killed runner never wedges the next deploy.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import secrets
import socket
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deployer.hostapi.checks import mask_url
from deployer.migrations.errors import BadInput, DatabaseUnavailable
from deployer.migrations.sqltext import pyformat_placeholders

# pg_try_advisory_lock(int4, int4) keys: "depl", "migr" (fit in a positive int4)
PG_LOCK_KEYS = (0x6465706C, 0x6D696772)
PG_TRANSIENT = {"55P03", "40P01", "40001"}  # lock_not_available, deadlock, serialization


@dataclass(frozen=True)
class DatabaseURL:
    url: str
    dialect: str  # "sqlite" | "postgresql"
    path: Path | None = None  # SQLite file

    @property
    def display(self) -> str:
        """The URL without its password, for messages."""
        return mask_url(self.url)


def parse_url(url: str) -> DatabaseURL:
    """`sqlite:///relative/path`, `sqlite:////absolute/path`, or `postgresql://...`."""
    if url.startswith("sqlite://"):
        rest = url.removeprefix("sqlite://")
        if not rest.startswith("/") or len(rest) < 2:
            raise BadInput(
                f"--database {mask_url(url)}: expected sqlite:///PATH (sqlite:////abs/path)"
            )
        return DatabaseURL(url, "sqlite", Path(rest[1:]))
    if url.startswith(("postgresql://", "postgres://")):
        return DatabaseURL(url, "postgresql")
    raise BadInput(f"--database {mask_url(url)!r}: expected sqlite:///PATH or postgresql://...")


@dataclass(frozen=True)
class Owner:
    """Who holds the migrations lock, for the message another runner prints."""

    who: str
    since: str


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def this_runner() -> str:
    return f"pid {os.getpid()} {_user()}@{socket.gethostname()}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class Database:
    """One connection in autocommit mode; transactions are explicit."""

    dialect = ""
    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, url: DatabaseURL, raw: Any) -> None:
        self.url = url
        self.raw = raw
        self.lock_token = secrets.token_hex(8)  # tells this runner's lock row from others'

    def execute(self, sql: str, params: tuple | list | None = None) -> Any:
        if params is None:
            return self.raw.execute(sql)
        return self.raw.execute(self.placeholders(sql), tuple(params))

    def placeholders(self, sql: str) -> str:
        return sql

    def query(self, sql: str, params: tuple | list | None = None) -> list[tuple]:
        return list(self.execute(sql, params).fetchall())

    def begin(self) -> None:
        self.execute("BEGIN")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        """Roll back if a transaction is open; never raises (the first error matters)."""
        try:
            if self.in_transaction():
                self.execute("ROLLBACK")
        except self.errors:
            pass

    def in_transaction(self) -> bool:
        raise NotImplementedError

    def durable_commits(self, on: bool) -> None:
        """Whether this transaction's COMMIT waits for the disk (see PostgresDatabase)."""

    def round_trip(self) -> contextlib.AbstractContextManager[Any]:
        """Statements sent together, answered together (PostgreSQL pipeline mode)."""
        return contextlib.nullcontext()

    def table_exists(self, name: str) -> bool:
        raise NotImplementedError

    def try_lock(self) -> Owner | None:
        """Take the runner lock: None when taken, else who holds it."""
        raise NotImplementedError

    def unlock(self) -> None:
        raise NotImplementedError

    def is_transient(self, exc: BaseException) -> bool:
        """A lock wait that timed out or a deadlock: worth one more try."""
        raise NotImplementedError

    def describe_error(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}".strip()

    def drop_invalid_index(self, statement_code: str) -> str | None:
        """After a failed CREATE INDEX CONCURRENTLY: drop the INVALID index it left."""
        return None

    def close(self) -> None:
        with contextlib.suppress(*self.errors):
            self.raw.close()


class SQLiteDatabase(Database):
    dialect = "sqlite"
    errors = (sqlite3.Error,)

    def begin(self) -> None:
        # IMMEDIATE takes the write lock up front: no deadlock upgrading a read later.
        self.execute("BEGIN IMMEDIATE")

    def in_transaction(self) -> bool:
        return self.raw.in_transaction

    def table_exists(self, name: str) -> bool:
        rows = self.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return bool(rows)

    def try_lock(self) -> Owner | None:
        # A quick look first (no waiting); if the database is busy, decide under the lock.
        with contextlib.suppress(sqlite3.OperationalError):
            if holder := self._live_holder():
                return holder
        try:
            self.begin()
        except sqlite3.OperationalError as e:
            return Owner(f"another writer (the database is busy: {e})", now_iso())
        try:
            self.execute(
                "CREATE TABLE IF NOT EXISTS deployer_migrations_lock ("
                " id INTEGER PRIMARY KEY CHECK (id = 1), owner TEXT NOT NULL,"
                " host TEXT NOT NULL, pid INTEGER NOT NULL, pid_start TEXT, since TEXT NOT NULL,"
                " token TEXT NOT NULL)"
            )
            holder = self._live_holder()
            if holder is None:
                self.execute(
                    "INSERT OR REPLACE INTO deployer_migrations_lock VALUES (1, ?, ?, ?, ?, ?, ?)",
                    (
                        this_runner(),
                        socket.gethostname(),
                        os.getpid(),
                        _pid_start(os.getpid()),
                        now_iso(),
                        self.lock_token,
                    ),
                )
            self.commit()
            return holder
        except BaseException:
            self.rollback()
            raise

    def _live_holder(self) -> Owner | None:
        try:
            rows = self.query(
                "SELECT owner, host, pid, pid_start, since, token FROM deployer_migrations_lock"
            )
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):  # no runner ever locked this database
                return None
            raise
        for owner, host, pid, pid_start, since, token in rows:
            mine = token == self.lock_token
            dead = host == socket.gethostname() and not _process_alive(pid, pid_start)
            if not mine and not dead:
                return Owner(owner, since)
        return None

    def unlock(self) -> None:
        self.execute("DELETE FROM deployer_migrations_lock WHERE token = ?", (self.lock_token,))

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _pid_start(pid: int) -> str | None:
    """The process start time (Linux), so a reused pid is not mistaken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _process_alive(pid: int, pid_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid_start is None or _pid_start(pid) in (None, pid_start)


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, url: DatabaseURL, raw: Any, psycopg: Any) -> None:
        super().__init__(url, raw)
        self.psycopg = psycopg
        self.errors = (psycopg.Error,)

    def placeholders(self, sql: str) -> str:
        return pyformat_placeholders(sql)

    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != self.psycopg.pq.TransactionStatus.IDLE

    def durable_commits(self, on: bool) -> None:
        # A backfill chunk's row locks are held until its COMMIT returns, and a WAL flush
        # can stall for a checkpoint: concurrent writers wait that long. Chunks commit
        # asynchronously instead. Safe for exactly-once: data and progress commit
        # together, so a server crash loses whole chunks, which the resume redoes.
        self.execute(f"SET LOCAL synchronous_commit = {'on' if on else 'off'}")

    def round_trip(self) -> contextlib.AbstractContextManager[Any]:
        return self.raw.pipeline()

    def table_exists(self, name: str) -> bool:
        return self.query("SELECT to_regclass(?) IS NOT NULL", (name,))[0][0]

    def try_lock(self) -> Owner | None:
        if self.query("SELECT pg_try_advisory_lock(?, ?)", PG_LOCK_KEYS)[0][0]:
            return None
        rows = self.query(
            "SELECT a.pid, a.application_name, a.usename, host(a.client_addr), a.backend_start"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = ? AND l.objid = ?"
            " AND l.objsubid = 2",
            PG_LOCK_KEYS,
        )
        if not rows:  # released between the two queries
            return self.try_lock()
        pid, app, user, addr, started = rows[0]
        who = f"{app or 'a session'} (server pid {pid}, role {user}, from {addr or 'local'})"
        since = started.astimezone(timezone.utc).isoformat(timespec="seconds") if started else "?"
        return Owner(who, since.replace("+00:00", "Z"))

    def unlock(self) -> None:
        self.execute("SELECT pg_advisory_unlock(?, ?)", PG_LOCK_KEYS)

    def is_transient(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) in PG_TRANSIENT

    def describe_error(self, exc: BaseException) -> str:
        diag = getattr(exc, "diag", None)
        if diag is None or not diag.message_primary:
            return super().describe_error(exc)
        text = f"{diag.message_primary} (SQLSTATE {diag.sqlstate})"
        return text + (f"; {diag.message_detail}" if diag.message_detail else "")

    def drop_invalid_index(self, statement_code: str) -> str | None:
        m = re.search(r"\bINDEX CONCURRENTLY (?:IF NOT EXISTS )?([\w$.\"]+)", statement_code)
        if not m:
            return None
        name = m.group(1)
        rows = self.query(
            "SELECT 1 FROM pg_index WHERE NOT indisvalid AND indexrelid = to_regclass(?)",
            (name.lower() if '"' not in name else name,),
        )
        if rows:
            self.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            return name
        return None


def connect(url: DatabaseURL, *, create: bool, lock_timeout: float) -> Database:
    """Open the database; a missing SQLite file reads as empty unless `create`."""
    if url.dialect == "sqlite":
        return _connect_sqlite(url, create, lock_timeout)
    return _connect_postgres(url, lock_timeout)


def _connect_sqlite(url: DatabaseURL, create: bool, lock_timeout: float) -> SQLiteDatabase:
    assert url.path is not None
    target = str(url.path)
    if not url.path.exists() and not create:
        target = ":memory:"  # status/lint/dry-run on a database not created yet: all pending
    elif create:
        url.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        raw = sqlite3.connect(target, isolation_level=None, timeout=lock_timeout)
        raw.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise DatabaseUnavailable(f"cannot open {url.display}: {e}") from None
    return SQLiteDatabase(url, raw)


def _connect_postgres(url: DatabaseURL, lock_timeout: float) -> PostgresDatabase:
    try:
        import psycopg
    except ImportError:
        raise BadInput(
            f"--database {url.display}: PostgreSQL needs psycopg on this host: "
            "pip install 'psycopg[binary]'"
        ) from None
    options: dict[str, Any] = {"autocommit": True, "application_name": _application_name()}
    if "connect_timeout" not in url.url:
        options["connect_timeout"] = 10
    try:
        raw = psycopg.connect(url.url, **options)
    except psycopg.Error as e:
        raise DatabaseUnavailable(f"cannot connect to {url.display}: {_one_line(e)}") from None
    db = PostgresDatabase(url, raw, psycopg)
    # A DDL statement queued behind a long query blocks all traffic behind it: give up
    # (and retry) rather than wait long.
    db.execute(f"SET lock_timeout = '{int(lock_timeout * 1000)}ms'")
    return db


def _application_name() -> str:
    return f"deployer-migrate {this_runner()}"[:63]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def backoff(attempt: int) -> None:
    """Sleep before retry `attempt` (1, 2, ...): 0.2 s, 0.4 s, 0.8 s ... with jitter."""
    import random

    time.sleep(0.2 * 2 ** (attempt - 1) * random.uniform(0.8, 1.2))
