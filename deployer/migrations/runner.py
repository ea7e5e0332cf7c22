"""The runner: status, up, down, lint and accept against one database.

Every operation that writes takes the runner lock first and releases it at the
end, whatever happens. Each migration runs in its own transaction with its
row in deployer_migrations, so a failure leaves the schema as it was before
that migration; chunked backfills commit (and record progress) per chunk.
Progress is reported as events (dicts), which the CLI prints as text or JSON.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deployer.migrations import state
from deployer.migrations.context import MigrationDB
from deployer.migrations.database import Database, backoff, connect, now_iso, parse_url
from deployer.migrations.errors import BadInput, LockHeld, MigrationFailed
from deployer.migrations.files import PHASES, Migration, discover, resolve, short
from deployer.migrations.lint import Violation, lint
from deployer.migrations.sqltext import Statement

Event = dict[str, Any]


@dataclass(frozen=True)
class MigrationStatus:
    name: str
    phase: str | None
    state: str  # applied | partial | pending | changed | missing
    file: str | None
    checksum: str | None  # of the file now
    applied_checksum: str | None  # recorded when it ran
    batch: int | None
    applied_at: str | None
    duration_ms: int | None
    progress: dict[str, Any] | None
    release: str | None

    def to_json(self) -> Event:
        return {"event": "migration", **asdict(self)}


@dataclass
class _Failure(Exception):
    """Where a migration failed, before it becomes a MigrationFailed."""

    error: BaseException
    statement: str | None = None
    line: int | None = None


class Runner:
    """Migrations in `directory` against `database` (sqlite:///... or postgresql://...)."""

    def __init__(
        self,
        directory: str | Path,
        database: str,
        *,
        release: str | None = None,
        on_event: Callable[[Event], None] | None = None,
        lock_wait: float = 0.0,
        lock_timeout: float = 5.0,
        retries: int = 3,
    ) -> None:
        self.directory = Path(directory)
        self.url = parse_url(database)
        self.release = release
        self.on_event = on_event or (lambda event: None)
        self.lock_wait = lock_wait
        self.lock_timeout = lock_timeout
        self.retries = retries

    # -- sessions ---------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Database]:
        db = connect(self.url, create=False, lock_timeout=self.lock_timeout)
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _locked(self) -> Iterator[Database]:
        db = connect(self.url, create=True, lock_timeout=self.lock_timeout)
        try:
            self._acquire(db)
            try:
                state.ensure_table(db)
                yield db
            finally:
                db.rollback()
                self._release(db)
        finally:
            db.close()

    def _acquire(self, db: Database) -> None:
        deadline = time.monotonic() + self.lock_wait
        while (owner := db.try_lock()) is not None:
            if time.monotonic() >= deadline:
                raise LockHeld(
                    f"{self.url.display}: migrations are locked by {owner.who} since "
                    f"{owner.since}; another runner is applying migrations"
                )
            time.sleep(0.5)

    @staticmethod
    def _release(db: Database) -> None:
        # Connection gone: PostgreSQL released the lock itself; a SQLite row is taken over.
        with contextlib.suppress(*db.errors):
            db.unlock()

    # -- reading ----------------------------------------------------------------------

    def migrations(self) -> list[Migration]:
        return discover(self.directory)

    def status(self) -> list[MigrationStatus]:
        migrations = self.migrations()
        with self._reading() as db:
            rows = state.read_rows(db)
        return statuses(migrations, rows)

    def lint(self, phase: str | None = None, everything: bool = False) -> list[Violation]:
        """Violations in pending migrations (all of them with `everything`)."""
        check_phase(phase)
        migrations = [m for m in self.migrations() if phase is None or m.phase == phase]
        if not everything:
            with self._reading() as db:
                rows = state.read_rows(db)
            migrations = [m for m in migrations if not _done(rows, m.name)]
        return lint(migrations, self.url.dialect)

    # -- up ---------------------------------------------------------------------------

    def up(
        self, phase: str | None = None, to: str | None = None, dry_run: bool = False
    ) -> list[str]:
        """Apply pending migrations (of one phase, up to `to`); names applied (or planned)."""
        check_phase(phase)
        migrations = self.migrations()
        last = resolve(to, migrations, "--to").name if to else None
        with self._reading() if dry_run else self._locked() as db:
            rows = state.read_rows(db)
            self._check_files(migrations, rows)
            todo = [
                m
                for m in migrations
                if not _done(rows, m.name)
                and (phase is None or m.phase == phase)
                and (last is None or m.name <= last)
            ]
            refuse_contract_before_expand(todo, migrations, rows)
            refuse_violations(lint(todo, db.dialect), "up")
            if dry_run:
                for m in todo:
                    self.on_event(_migration_event("plan", m, rows.get(m.name)))
            else:
                batch = state.next_batch(db)
                for m in todo:
                    self._apply(db, m, rows.get(m.name), batch)
        names = [m.name for m in todo]
        self.on_event(
            {
                "event": "done",
                "ok": True,
                "command": "up",
                "phase": phase,
                "applied": names,
                "dry_run": dry_run,
            }
        )
        return names

    def _check_files(self, migrations: list[Migration], rows: dict[str, state.Row]) -> None:
        """Refuse changed files (by name); report vanished ones."""
        by_name = {m.name: m for m in migrations}
        changed = [
            f"{by_name[r.name].path} (applied {short(r.checksum)}, "
            f"file now {short(by_name[r.name].checksum)})"
            for r in state.applied_order(rows)
            if r.name in by_name and by_name[r.name].checksum != r.checksum
        ]
        if changed:
            raise BadInput(
                "changed after it was applied (checksum mismatch): "
                + "; ".join(changed)
                + ". Restore the file, or record the change with `deployer migrate accept NAME`"
            )
        for r in state.applied_order(rows):
            if r.name not in by_name:
                self.on_event(
                    {
                        "event": "missing",
                        "name": r.name,
                        "phase": r.phase,
                        "batch": r.batch,
                        "message": f"{r.name}: applied in batch {r.batch} but its file is gone",
                    }
                )

    def _apply(self, db: Database, m: Migration, row: state.Row | None, batch: int) -> None:
        self.on_event(_migration_event("start", m, row))
        started = time.monotonic()
        record = _Recorder(db, self, m, row, batch, started)
        for attempt in range(self.retries + 1):
            try:
                self._run(db, m, "up", record)
                break
            except _Failure as f:
                db.rollback()
                if not (m.transactional and db.is_transient(f.error)) or attempt == self.retries:
                    raise self._failed(db, m, "up", f, record.progress) from None
                self.on_event(
                    {
                        "event": "retry",
                        "name": m.name,
                        "attempt": attempt + 1,
                        "error": db.describe_error(f.error),
                    }
                )
                backoff(attempt + 1)
        self.on_event(
            {
                "event": "applied",
                "name": m.name,
                "phase": m.phase,
                "batch": batch,
                "duration_ms": record.duration_ms(),
                "progress": record.progress,
            }
        )

    # -- down -------------------------------------------------------------------------

    def down(
        self,
        steps: int | None = None,
        to: str | None = None,
        phase: str | None = None,
        release: str | None = None,
    ) -> list[str]:
        """Run down sections newest first: `steps` of them (default 1), or back to `to`
        (which stays applied), or every one `release` applied; `phase` narrows any."""
        check_phase(phase)
        if steps is not None and steps < 1:
            raise BadInput(f"--steps {steps}: expected 1 or more")
        migrations = self.migrations()
        by_name = {m.name: m for m in migrations}
        with self._locked() as db:
            rows = state.read_rows(db)
            self._check_files(migrations, rows)
            chosen = choose_down(rows, migrations, steps, to, phase, release)
            refuse_irreversible(chosen, by_name)
            for r in chosen:
                self._revert(db, by_name[r.name])
        names = [r.name for r in chosen]
        self.on_event({"event": "done", "ok": True, "command": "down", "reverted": names})
        return names

    def _revert(self, db: Database, m: Migration) -> None:
        self.on_event(_migration_event("start", m, None) | {"direction": "down"})
        started = time.monotonic()
        record = _Recorder(db, self, m, None, 0, started, reverting=True)
        try:
            self._run(db, m, "down", record)
        except _Failure as f:
            db.rollback()
            raise self._failed(db, m, "down", f, None) from None
        self.on_event(
            {
                "event": "reverted",
                "name": m.name,
                "phase": m.phase,
                "duration_ms": record.duration_ms(),
            }
        )

    # -- accept -----------------------------------------------------------------------

    def accept(self, name: str) -> str:
        """Record the current checksum of an applied migration whose file was changed."""
        migrations = self.migrations()
        m = resolve(name, migrations, "NAME")
        with self._locked() as db:
            rows = state.read_rows(db)
            if m.name not in rows:
                raise BadInput(f"NAME {name}: {m.name} is not applied; nothing to accept")
            old = rows[m.name].checksum
            state.set_checksum(db, m.name, m.checksum)
        self.on_event(
            {"event": "accepted", "name": m.name, "old_checksum": old, "checksum": m.checksum}
        )
        return m.name

    # -- running one migration --------------------------------------------------------

    def _run(self, db: Database, m: Migration, direction: str, record: _Recorder) -> None:
        """Run one direction of `m` and record it; any error becomes a _Failure."""
        if m.transactional:
            _guard(db.begin)
        if m.kind == "sql":
            section = m.up if direction == "up" else m.down
            assert section is not None
            self._run_statements(db, m, section.statements(db.dialect))
        else:
            self._run_python(db, m, direction, record)
        _guard(lambda: _in_transaction(db, m, record.finish))

    def _run_statements(self, db: Database, m: Migration, statements: list[Statement]) -> None:
        for s in statements:
            try:
                db.execute(s.text)
            except db.errors as e:
                db.rollback()
                if not m.transactional:
                    db.drop_invalid_index(s.code)
                raise _Failure(e, s.text, s.line) from None

    def _run_python(self, db: Database, m: Migration, direction: str, record: _Recorder) -> None:
        mdb = MigrationDB(db, record.progress_value())
        try:
            result = getattr(m.load_module(), direction)(mdb)
            if inspect.isgenerator(result):
                record.start_chunks()
                for value in result:
                    record.chunk(value if value is not None else mdb.last_batch_end)
                    mdb.progress = record.progress_value()
        except Exception as e:  # user code: anything can happen, report it with its line
            raise _Failure(e, _statement_of(db, mdb, e), _line_in(m.path, e)) from None

    def _failed(
        self, db: Database, m: Migration, direction: str, f: _Failure, progress: Any
    ) -> MigrationFailed:
        where = f"{m.path}:{f.line}" if f.line else str(m.path)
        error = db.describe_error(f.error)
        message = f"{where}: {m.name} ({direction}) failed: {error}"
        if f.statement:
            message += f"\n    statement: {' '.join(f.statement.split())[:300]}"
        if progress:
            message += (
                f"\n    {progress['chunks']} chunk(s) committed (progress {progress['value']!r});"
                " the next `up` resumes after them"
            )
        else:
            message += "\n    rolled back: the schema is as it was before this migration"
        return MigrationFailed(
            message,
            name=m.name,
            phase=m.phase,
            direction=direction,
            file=str(m.path),
            line=f.line,
            statement=f.statement,
            error=error,
            progress=progress,
        )


class _Recorder:
    """Keeps a migration's row in deployer_migrations in step with its progress."""

    def __init__(
        self,
        db: Database,
        runner: Runner,
        m: Migration,
        row: state.Row | None,
        batch: int,
        started: float,
        reverting: bool = False,
    ) -> None:
        self.db, self.runner, self.m = db, runner, m
        self.batch, self.started, self.reverting = batch, started, reverting
        self.prior_ms = row.duration_ms if row else 0
        self.started_at = row.started_at if row else now_iso()
        self.progress = row.progress_data if row else None
        self.chunked = False

    def duration_ms(self) -> int:
        return self.prior_ms + int((time.monotonic() - self.started) * 1000)

    def progress_value(self) -> Any:
        return self.progress["value"] if self.progress else None

    def start_chunks(self) -> None:
        self.chunked = self.m.transactional
        if self.chunked:
            self.db.durable_commits(False)

    def chunk(self, value: Any) -> None:
        """A chunk is done: commit it with its progress (a reverting run records none)."""
        chunks = (self.progress or {}).get("chunks", 0) + 1
        progress = {"chunks": chunks, "value": _jsonable(value)}
        with self.db.round_trip():  # the chunk's row locks go with the COMMIT: no waits
            if not self.reverting:
                self._save(applied_at=None, progress=progress)
            if self.chunked:
                self.db.commit()
                self.db.begin()
                self.db.durable_commits(False)
        self.progress = progress  # only once committed: a retry resumes from here
        self.runner.on_event(
            {"event": "chunk", "name": self.m.name, "chunk": chunks, "progress": value}
        )

    def finish(self) -> None:
        if self.chunked:
            self.db.durable_commits(True)  # the row that says "applied" waits for the disk
        if self.reverting:
            state.delete(self.db, self.m.name)
        else:
            self._save(applied_at=now_iso(), progress=self.progress)

    def _save(self, applied_at: str | None, progress: dict[str, Any] | None) -> None:
        state.save(
            self.db,
            state.Row(
                name=self.m.name,
                phase=self.m.phase,
                checksum=self.m.checksum,
                batch=self.batch,
                applied_at=applied_at,
                duration_ms=self.duration_ms(),
                progress=json.dumps(progress) if progress else None,
                release=self.runner.release,
                started_at=self.started_at,
            ),
        )


def _in_transaction(db: Database, m: Migration, write: Callable[[], None]) -> None:
    """Write the state row: in the migration's transaction, or in its own one."""
    if not m.transactional:
        db.begin()
    write()
    db.commit()


def _guard(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as e:
        raise _Failure(e) from None


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)  # e.g. a datetime key: kept as text, still ordered for resume


def _statement_of(db: Database, mdb: MigrationDB, e: BaseException) -> str | None:
    return mdb.last_statement if isinstance(e, db.errors) else None


def _line_in(path: Path, e: BaseException) -> int | None:
    """The line of the migration file where `e` was raised (deepest frame in it)."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == str(path)]
    if isinstance(e, SyntaxError) and e.filename == str(path):
        lines.append(e.lineno or 0)
    return lines[-1] if lines else None


def _done(rows: dict[str, state.Row], name: str) -> bool:
    return name in rows and rows[name].done


def _migration_event(event: str, m: Migration, row: state.Row | None) -> Event:
    out: Event = {"event": event, "name": m.name, "phase": m.phase, "file": str(m.path)}
    if row is not None and row.progress_data:
        out["resume_from"] = row.progress_data
    return out


def check_phase(phase: str | None) -> None:
    if phase is not None and phase not in PHASES:
        raise BadInput(f"--phase {phase}: expected one of {', '.join(PHASES)}")


def refuse_violations(violations: list[Violation], command: str) -> None:
    if violations:
        listing = "\n".join(str(v) for v in violations)
        raise BadInput(
            f"{command} refused: {len(violations)} lint violation(s); nothing was run\n{listing}\n"
            "(a `-- deployer: allow <rule>` comment in the file overrides one rule)"
        )


def refuse_contract_before_expand(
    todo: list[Migration], migrations: list[Migration], rows: dict[str, state.Row]
) -> None:
    """A contract may rely on every expand before it (a backfill before a drop)."""
    pending_expand = [m for m in migrations if m.phase == "expand" and not _done(rows, m.name)]
    planned = {m.name for m in todo}
    blocked = [
        m.name
        for m in todo
        if m.phase == "contract"
        and any(e.name < m.name and e.name not in planned for e in pending_expand)
    ]
    if blocked:
        first = next(e.name for e in pending_expand if e.name not in planned)
        raise BadInput(
            f"contract refused, nothing was run: {', '.join(blocked)} would run before the "
            f"older expand migration {first}; run `up --phase expand` first"
        )


def choose_down(
    rows: dict[str, state.Row],
    migrations: list[Migration],
    steps: int | None,
    to: str | None,
    phase: str | None,
    release: str | None,
) -> list[state.Row]:
    """The rows to revert, newest first."""
    order = state.applied_order(rows)
    if to is not None:
        target = resolve(to, migrations, "--to").name
        if target not in rows:
            raise BadInput(f"--to {to}: {target} is not applied")
        order = order[[r.name for r in order].index(target) + 1 :]
    candidates = [
        r
        for r in order
        if (phase is None or r.phase == phase) and (release is None or r.release == release)
    ]
    if steps is None and to is None and release is None:
        steps = 1
    chosen = candidates[-steps:] if steps else candidates
    return list(reversed(chosen))


def refuse_irreversible(chosen: list[state.Row], by_name: dict[str, Migration]) -> None:
    problems = [
        f"{r.name}: its file is gone"
        if r.name not in by_name
        else f"{by_name[r.name].path}: no down section"
        for r in chosen
        if r.name not in by_name or not by_name[r.name].has_down
    ]
    if problems:
        raise BadInput("down refused, nothing was reverted: " + "; ".join(problems))


def statuses(migrations: list[Migration], rows: dict[str, state.Row]) -> list[MigrationStatus]:
    by_name = {m.name: m for m in migrations}
    out = []
    for name in sorted(set(by_name) | set(rows)):
        m, r = by_name.get(name), rows.get(name)
        if m is None:
            # a run that was cut short (a killed backfill) is in progress, whichever
            # release's files are read now: its file is in the release that ran it
            st = "partial" if r is not None and not r.done else "missing"
        elif r is None:
            st = "pending"
        elif r.checksum != m.checksum:
            st = "changed"
        else:
            st = "applied" if r.done else "partial"
        out.append(
            MigrationStatus(
                name=name,
                phase=m.phase if m else r.phase if r else None,
                state=st,
                file=str(m.path) if m else None,
                checksum=m.checksum if m else None,
                applied_checksum=r.checksum if r else None,
                batch=r.batch if r else None,
                applied_at=r.applied_at if r else None,
                duration_ms=r.duration_ms if r else None,
                progress=r.progress_data if r else None,
                release=r.release if r else None,
            )
        )
    return out
