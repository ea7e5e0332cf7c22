"""Migrations runner on SQLite and on the real PostgreSQL server (same tests, both engines).

Lint rules, the SQL splitter and file parsing are tested without a database;
PostgreSQL-only behaviour (CONCURRENTLY, lock_timeout retries, the example
series) is in test_migrations_pg.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pg_helpers
import pytest

from deployer.migrations import Runner
from deployer.migrations.cli import main
from deployer.migrations.database import connect, parse_url
from deployer.migrations.errors import BadInput, LockHeld, MigrationFailed
from deployer.migrations.files import discover, new_migration
from deployer.migrations.lint import RULES, lint_migration
from deployer.migrations.sqltext import pyformat_placeholders, split_statements

# The PostgreSQL fixtures, registered in this module.
pg_database = pg_helpers.pg_database
pg_url = pg_helpers.pg_url

EXAMPLE_BACKFILL = (
    Path(__file__).resolve().parent.parent
    / "examples/migrations/migrations/20240602000100_backfill_people_name.py"
)

# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'app.sqlite3'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def mdir(tmp_path: Path) -> Path:
    d = tmp_path / "migrations"
    d.mkdir()
    return d


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def sql(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    """Run one statement outside the runner (autocommit) and return its rows."""
    db = connect(parse_url(url), create=True, lock_timeout=5)
    try:
        cur = db.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []
    finally:
        db.close()


def columns(url: str, table: str) -> list[str]:
    if url.startswith("sqlite"):
        return [r[1] for r in sql(url, f"PRAGMA table_info({table})")]
    rows = sql(
        url,
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?"
        " ORDER BY ordinal_position",
        (table,),
    )
    return [r[0] for r in rows]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def people_series(d: Path) -> None:
    """The seed pattern, portable SQL: create, expand (add name), backfill, contract."""
    write(
        d,
        "20240101000000_create_people.sql",
        """
        -- phase: expand
        -- up
        CREATE TABLE people (id INTEGER PRIMARY KEY, fname TEXT NOT NULL, lname TEXT NOT NULL);
        INSERT INTO people (id, fname, lname) VALUES (1, 'Ada', 'Lovelace'), (2, 'Alan', 'Turing');
        -- down
        DROP TABLE people; -- deployer lint does not read down sections
        """,
    )
    write(
        d,
        "20240102000000_add_name.sql",
        """
        -- phase: expand
        -- up
        ALTER TABLE people ADD COLUMN name TEXT;
        -- down
        ALTER TABLE people DROP COLUMN name;
        """,
    )
    # the example's backfill (portable SQL), one row per chunk so two rows make two chunks
    backfill = EXAMPLE_BACKFILL.read_text().replace("size=1000", "size=1")
    (d / "20240103000000_backfill_name.py").write_text(backfill)
    write(
        d,
        "20240104000000_drop_fname_lname.sql",
        """
        -- phase: contract
        -- up
        ALTER TABLE people DROP COLUMN fname;
        ALTER TABLE people DROP COLUMN lname;
        """,
    )


def add_name_with(d: Path, *more: str) -> None:
    """Replace the series' add_name migration with one that does more (line 4 onwards)."""
    lines = ["-- phase: expand", "-- up", "ALTER TABLE people ADD COLUMN name TEXT;", *more]
    (d / "20240102000000_add_name.sql").write_text("\n".join(lines) + "\n")


# -- the happy path -----------------------------------------------------------------------


def test_expand_then_contract_status_and_down(
    db_url: str, mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people_series(mdir)
    code, out, _ = cli(capsys, "status", "--dir", str(mdir), "--database", db_url, "--json")
    assert code == 0
    summary = events(out)[-1]
    assert summary["event"] == "summary" and summary["pending"] == {"expand": 3, "contract": 1}

    code, out, err = cli(
        capsys, "up", "--phase", "expand", "--release", "r1", "--dir", str(mdir),
        "--database", db_url, "--json",
    )  # fmt: skip
    assert code == 0, err
    evs = events(out)
    assert [e["name"] for e in evs if e["event"] == "applied"] == [
        "20240101000000_create_people",
        "20240102000000_add_name",
        "20240103000000_backfill_name",
    ]
    assert [e["progress"] for e in evs if e["event"] == "chunk"] == [1, 2]
    assert evs[-1] == {
        "event": "done", "ok": True, "command": "up", "phase": "expand",
        "applied": [e["name"] for e in evs if e["event"] == "applied"], "dry_run": False,
    }  # fmt: skip
    # expand kept the old columns: old code still works, new code finds the name
    assert sql(db_url, "SELECT fname, name FROM people ORDER BY id") == [
        ("Ada", "Ada Lovelace"),
        ("Alan", "Alan Turing"),
    ]

    runner = Runner(mdir, db_url, release="r2")
    assert runner.up(phase="contract") == ["20240104000000_drop_fname_lname"]
    assert columns(db_url, "people") == ["id", "name"]
    st = {s.name: s for s in runner.status()}
    assert {s.state for s in st.values()} == {"applied"}
    assert st["20240101000000_create_people"].release == "r1"
    assert st["20240104000000_drop_fname_lname"].release == "r2"
    assert st["20240103000000_backfill_name"].progress == {"chunks": 2, "value": 2}
    assert (
        st["20240104000000_drop_fname_lname"].batch == st["20240101000000_create_people"].batch + 1
    )
    assert runner.up() == []  # up to date

    # the contract migration has no down section: refused, nothing reverted
    code, _, err = cli(capsys, "down", "--dir", str(mdir), "--database", db_url)
    assert code == 2 and "20240104000000_drop_fname_lname.sql: no down section" in err
    assert columns(db_url, "people") == ["id", "name"]


def test_down_steps_to_release_and_phase(db_url: str, mdir: Path) -> None:
    people_series(mdir)
    (mdir / "20240104000000_drop_fname_lname.sql").unlink()
    Runner(mdir, db_url, release="r1").up(to="add_name")
    Runner(mdir, db_url, release="r2").up()
    runner = Runner(mdir, db_url)
    assert runner.down(release="r2") == ["20240103000000_backfill_name"]
    assert [s.state for s in runner.status()] == ["applied", "applied", "pending"]
    assert runner.down(to="20240101000000") == ["20240102000000_add_name"]
    assert columns(db_url, "people") == ["id", "fname", "lname"]
    assert runner.down(steps=5, phase="contract") == []
    assert runner.down(steps=5) == ["20240101000000_create_people"]
    assert [s.state for s in runner.status()] == ["pending"] * 3


def test_dry_run_and_to_change_nothing_beyond(db_url: str, mdir: Path) -> None:
    people_series(mdir)
    seen: list[dict[str, Any]] = []
    runner = Runner(mdir, db_url, on_event=seen.append)
    planned = runner.up(phase="expand", dry_run=True)
    assert len(planned) == 3 and [e["event"] for e in seen][:3] == ["plan"] * 3
    assert [s.state for s in runner.status()] == ["pending"] * 4
    assert runner.up(to="20240102000000_add_name.sql") == [
        "20240101000000_create_people",
        "20240102000000_add_name",
    ]
    assert [s.state for s in runner.status()] == ["applied", "applied", "pending", "pending"]


def test_contract_waits_for_older_expand_migrations(db_url: str, mdir: Path) -> None:
    people_series(mdir)
    Runner(mdir, db_url).up(to="add_name")
    with pytest.raises(BadInput, match="older expand migration 20240103000000_backfill_name"):
        Runner(mdir, db_url).up(phase="contract")
    assert columns(db_url, "people") == ["id", "fname", "lname", "name"]
    assert Runner(mdir, db_url).up() == [  # in file order the backfill comes first
        "20240103000000_backfill_name",
        "20240104000000_drop_fname_lname",
    ]


# -- failures -----------------------------------------------------------------------------


def test_failing_migration_rolls_back_and_stops(
    db_url: str, mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people_series(mdir)
    add_name_with(
        mdir, "CREATE TABLE half_done (id INTEGER);", "ALTER TABLE no_such_table ADD COLUMN x TEXT;"
    )
    code, out, err = cli(capsys, "up", "--dir", str(mdir), "--database", db_url, "--json")
    assert code == 1
    error = events(out)[-1]
    assert error["event"] == "error" and error["exit"] == 1
    assert error["name"] == "20240102000000_add_name" and error["line"] == 5
    assert error["statement"] == "ALTER TABLE no_such_table ADD COLUMN x TEXT"
    assert "no_such_table" in error["error"]
    assert "20240102000000_add_name.sql:5" in err and "Traceback" not in err
    # the first migration stays, the failing one left nothing, the later ones never ran
    assert columns(db_url, "people") == ["id", "fname", "lname"]
    with pytest.raises(Exception, match="half_done"):
        sql(db_url, "SELECT * FROM half_done")
    states = [s.state for s in Runner(mdir, db_url).status()]
    assert states == ["applied", "pending", "pending", "pending"]


def test_failing_python_migration_names_its_line(db_url: str, mdir: Path) -> None:
    write(
        mdir,
        "20240101000000_boom.py",
        """
        phase = "expand"

        def up(db):
            db.execute("CREATE TABLE t (id INTEGER)")
            raise RuntimeError("backfill source unavailable")
        """,
    )
    with pytest.raises(MigrationFailed) as err:
        Runner(mdir, db_url).up()
    assert err.value.details["line"] == 5
    assert "backfill source unavailable" in str(err.value) and "rolled back" in str(err.value)
    assert Runner(mdir, db_url).status()[0].state == "pending"


def test_checksum_mismatch_refused_until_accepted(
    db_url: str, mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people_series(mdir)
    Runner(mdir, db_url).up(to="add_name")
    changed = mdir / "20240102000000_add_name.sql"
    changed.write_text(changed.read_text().replace("name TEXT", "name VARCHAR(41)"))
    assert Runner(mdir, db_url).status()[1].state == "changed"
    code, _, err = cli(capsys, "up", "--dir", str(mdir), "--database", db_url)
    assert code == 2 and str(changed) in err and "checksum mismatch" in err
    assert Runner(mdir, db_url).status()[2].state == "pending"  # nothing ran
    code, out, _ = cli(
        capsys, "accept", "add_name", "--dir", str(mdir), "--database", db_url, "--json"
    )
    assert code == 0 and events(out)[-1]["event"] == "accepted"
    assert Runner(mdir, db_url).up() != []


def test_vanished_file_is_reported(
    db_url: str, mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people_series(mdir)
    Runner(mdir, db_url).up(to="add_name")
    (mdir / "20240102000000_add_name.sql").unlink()
    assert Runner(mdir, db_url).status()[1].state == "missing"
    code, _, err = cli(capsys, "up", "--phase", "expand", "--dir", str(mdir), "--database", db_url)
    assert code == 0 and "20240102000000_add_name: applied in batch 1 but its file is gone" in err
    code, _, err = cli(capsys, "down", "--steps", "3", "--dir", str(mdir), "--database", db_url)
    assert code == 2 and "20240102000000_add_name: its file is gone" in err


# -- locking ------------------------------------------------------------------------------


def blocking_migration(d: Path) -> tuple[Path, Path]:
    """A migration that holds the runner lock until the test lets it go."""
    started, release = d.parent / "started", d.parent / "release"
    write(
        d,
        "20240101000000_slow.py",
        f"""
        import time
        from pathlib import Path

        phase = "expand"

        def up(db):
            Path({str(started)!r}).touch()
            while not Path({str(release)!r}).exists():
                time.sleep(0.02)
        """,
    )
    return started, release


def wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_second_runner_exits_3_naming_the_holder(
    db_url: str, mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started, release = blocking_migration(mdir)
    holder = threading.Thread(target=Runner(mdir, db_url).up)
    holder.start()
    try:
        wait_for(started)
        code, out, err = cli(capsys, "up", "--dir", str(mdir), "--database", db_url, "--json")
        assert code == 3
        assert f"pid {os.getpid()}" in err and " since 20" in err and "locked by" in err
        assert events(out)[-1]["exit"] == 3
        with pytest.raises(LockHeld):
            Runner(mdir, db_url).down()
    finally:
        release.touch()
        holder.join(10)
    # released at the end: the next runner gets it
    assert Runner(mdir, db_url).up() == []


def test_lock_wait_outlasts_the_holder(db_url: str, mdir: Path) -> None:
    started, release = blocking_migration(mdir)
    holder = threading.Thread(target=Runner(mdir, db_url).up)
    holder.start()
    wait_for(started)
    threading.Timer(0.7, release.touch).start()
    t0 = time.monotonic()
    assert Runner(mdir, db_url, lock_wait=20).up() == []
    assert time.monotonic() - t0 >= 0.5
    holder.join(10)


# -- chunked backfills --------------------------------------------------------------------

BACKFILL = """
import os
import time
from pathlib import Path

phase = "expand"

def up(db):
    for lo, hi in db.batches("items", size=1000):
        db.execute("UPDATE items SET n = n + 1 WHERE id BETWEEN ? AND ?", (lo, hi))
        time.sleep(float(os.environ.get("CHUNK_SLEEP", "0")))
        fail_at = os.environ.get("FAIL_AT_ID")
        if fail_at and lo <= int(fail_at) <= hi and not Path(os.environ["FAILED_ONCE"]).exists():
            Path(os.environ["FAILED_ONCE"]).touch()
            raise RuntimeError("chunk failed")
        yield  # progress = the chunk's last id (db.batches remembers it)
"""


def seed_items(url: str, count: int) -> None:
    sql(url, "CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)")
    if url.startswith("sqlite"):
        series = "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?)"
        sql(url, f"{series} INSERT INTO items (id) SELECT i FROM s", (count,))
    else:
        sql(url, "INSERT INTO items (id) SELECT generate_series(1, ?)", (count,))


def item_counts(url: str) -> dict[int, int]:
    return dict(sql(url, "SELECT n, count(*) FROM items GROUP BY n"))


def test_failed_chunk_keeps_committed_ones_and_resumes(
    db_url: str, mdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_items(db_url, 5500)
    write(mdir, "20240101000000_backfill_items.py", BACKFILL)
    monkeypatch.setenv("FAIL_AT_ID", "3500")
    monkeypatch.setenv("FAILED_ONCE", str(tmp_path / "failed-once"))
    with pytest.raises(MigrationFailed, match="3 chunk.s. committed .progress 3000.") as err:
        Runner(mdir, db_url).up()
    assert err.value.details["progress"] == {"chunks": 3, "value": 3000}
    assert item_counts(db_url) == {1: 3000, 0: 2500}
    status = Runner(mdir, db_url).status()[0]
    assert status.state == "partial" and status.progress == {"chunks": 3, "value": 3000}

    seen: list[dict[str, Any]] = []
    Runner(mdir, db_url, on_event=seen.append).up()
    assert seen[0]["resume_from"] == {"chunks": 3, "value": 3000}
    assert [e["progress"] for e in seen if e["event"] == "chunk"] == [4000, 5000, 5500]
    assert item_counts(db_url) == {1: 5500}  # every row exactly once
    assert Runner(mdir, db_url).status()[0].progress == {"chunks": 6, "value": 5500}


def backfill_process(db_url: str, mdir: Path, rows: int, chunks: int) -> subprocess.Popen[str]:
    """`python -m deployer.migrations up --json` on `rows` items, once `chunks` committed."""
    seed_items(db_url, rows)
    write(mdir, "20240101000000_backfill_items.py", BACKFILL)
    cmd = [sys.executable, "-m", "deployer.migrations", "up", "--json"]
    cmd += ["--dir", str(mdir), "--database", db_url]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "CHUNK_SLEEP": "0.01"}
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "chunk" and event["chunk"] >= chunks:
            return proc
    pytest.fail(f"the backfill ended before {chunks} chunks: exit {proc.wait()}")


def test_sigkill_mid_backfill_resumes_every_row_exactly_once(db_url: str, mdir: Path) -> None:
    rows = 100_000
    proc = backfill_process(db_url, mdir, rows, chunks=20)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    cmd = proc.args

    status = Runner(mdir, db_url).status()[0]
    assert status.state == "partial"
    chunks = status.progress["chunks"]
    assert 20 <= chunks < 100
    # progress and data were committed together: exactly the recorded chunks are done
    assert item_counts(db_url) == {1: chunks * 1000, 0: rows - chunks * 1000}

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    first = json.loads(resumed.stdout.splitlines()[0])
    assert first["resume_from"]["chunks"] == chunks
    assert item_counts(db_url) == {1: rows}
    assert Runner(mdir, db_url).status()[0].progress == {"chunks": 100, "value": rows}


def test_sigterm_stops_between_chunks_and_releases_the_lock(db_url: str, mdir: Path) -> None:
    proc = backfill_process(db_url, mdir, 30_000, chunks=5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 130
    last = json.loads(out.splitlines()[-1])
    assert last["event"] == "error" and "SIGTERM" in last["message"]
    status = Runner(mdir, db_url).status()[0]
    assert status.state == "partial"
    assert item_counts(db_url)[1] == status.progress["chunks"] * 1000
    if db_url.startswith("sqlite"):  # the lock row went with the runner
        assert sql(db_url, "SELECT count(*) FROM deployer_migrations_lock") == [(0,)]
    assert Runner(mdir, db_url).up() == ["20240101000000_backfill_items"]
    assert item_counts(db_url) == {1: 30_000}


# -- lint ---------------------------------------------------------------------------------

# (rule, dialect, phase, trips it, does not)
LINT_CASES = [
    ("drop-table", "sqlite", "expand", "DROP TABLE people", "CREATE TABLE t (id INT)"),
    ("drop-column", "sqlite", "expand",
     "ALTER TABLE people DROP COLUMN fname", "ALTER TABLE people ALTER COLUMN fname DROP DEFAULT"),
    ("rename-table", "postgresql", "expand",
     "ALTER TABLE people RENAME TO persons", "CREATE TABLE persons (id INT)"),
    ("rename-column", "sqlite", "expand",
     "ALTER TABLE people RENAME COLUMN fname TO first_name",
     "ALTER TABLE people ADD COLUMN first_name TEXT"),
    ("change-column-type", "postgresql", "expand",
     "ALTER TABLE people ALTER COLUMN fname TYPE varchar(100)",
     "ALTER TABLE people ADD COLUMN fname_long varchar(100)"),
    ("add-not-null-column-without-default", "postgresql", "expand",
     "ALTER TABLE people ADD COLUMN age integer NOT NULL",
     "ALTER TABLE people ADD COLUMN age integer NOT NULL DEFAULT 0"),
    ("set-not-null", "postgresql", "expand",
     "ALTER TABLE people ALTER COLUMN name SET NOT NULL",
     "ALTER TABLE people ALTER COLUMN name DROP NOT NULL"),
    ("constraint-without-not-valid", "postgresql", "expand",
     "ALTER TABLE people ADD CONSTRAINT fk_team FOREIGN KEY (team_id) REFERENCES teams (id)",
     "ALTER TABLE people ADD CONSTRAINT fk_team FOREIGN KEY (team_id) REFERENCES teams (id)"
     " NOT VALID"),
    ("index-without-concurrently", "postgresql", "contract",
     "CREATE INDEX people_name ON people (name)",
     "CREATE TABLE t (id INT, name TEXT); CREATE INDEX t_name ON t (name)"),
    ("concurrently-in-transaction", "postgresql", "expand",
     "CREATE INDEX CONCURRENTLY IF NOT EXISTS people_name ON people (name)",
     "-- transaction: none\nCREATE INDEX CONCURRENTLY IF NOT EXISTS people_name ON people (name)"),
    ("several-statements-without-transaction", "postgresql", "expand",
     "-- transaction: none\nCREATE INDEX CONCURRENTLY a ON people (fname);"
     " CREATE INDEX CONCURRENTLY b ON people (lname)",
     "-- transaction: none\nCREATE INDEX CONCURRENTLY a ON people (fname)"),
    ("update-without-where", "sqlite", "contract",
     "UPDATE people SET name = (SELECT 'x' FROM teams WHERE teams.id = 1)",
     "UPDATE people SET name = fname || ' ' || lname WHERE name IS NULL"),
    ("delete-without-where", "postgresql", "expand",
     "DELETE FROM sessions", "DELETE FROM sessions WHERE expires_at < now()"),
    ("truncate", "sqlite", "contract", "TRUNCATE sessions", "DELETE FROM sessions WHERE id = 1"),
    ("transaction-control", "sqlite", "expand",
     "COMMIT; ALTER TABLE people ADD COLUMN x TEXT",
     "CREATE TRIGGER t AFTER INSERT ON people BEGIN UPDATE people SET name = 'x'"
     " WHERE id = NEW.id; END"),
]  # fmt: skip


def case_file(path: Path, phase: str, body: str) -> Path:
    """A .sql migration from a lint case: `-- transaction` lines of `body` go to the header."""
    headers = [line for line in body.splitlines() if line.startswith("-- transaction")]
    statements = "\n".join(line for line in body.splitlines() if line not in headers)
    path.write_text("\n".join([f"-- phase: {phase}", *headers, "-- up", statements, ""]))
    return path


def lint_text(tmp_path: Path, phase: str, dialect: str, body: str) -> list[str]:
    case_file(tmp_path / "20240101000000_case.sql", phase, body)
    return [v.rule for v in lint_migration(discover(tmp_path)[0], dialect)]


def test_every_rule_has_a_case_and_is_documented() -> None:
    assert sorted(c[0] for c in LINT_CASES) == sorted(r.name for r in RULES)
    doc = (Path(__file__).parent.parent / "deployer" / "migrations" / "README.md").read_text()
    assert [r.name for r in RULES if f"| `{r.name}` |" not in doc] == []


@pytest.mark.parametrize(("rule", "dialect", "phase", "bad", "good"), LINT_CASES)
def test_lint_rule(
    rule: str, dialect: str, phase: str, bad: str, good: str, tmp_path: Path
) -> None:
    assert rule in lint_text(tmp_path, phase, dialect, bad)
    assert rule not in lint_text(tmp_path, phase, dialect, good)
    # `-- deployer: allow <rule>` turns off exactly that rule
    assert rule not in lint_text(tmp_path, phase, dialect, f"-- deployer: allow {rule}\n{bad}")


def test_contract_may_drop_and_rename_but_sqlite_skips_pg_only_rules(tmp_path: Path) -> None:
    assert lint_text(tmp_path, "contract", "postgresql", "ALTER TABLE p DROP COLUMN a") == []
    assert lint_text(tmp_path, "contract", "sqlite", "ALTER TABLE p RENAME COLUMN a TO b") == []
    assert lint_text(tmp_path, "expand", "sqlite", "CREATE INDEX i ON p (a)") == []


def test_lint_reads_sql_strings_in_python_migrations(tmp_path: Path) -> None:
    write(
        tmp_path,
        "20240101000000_py.py",
        """
        phase = "expand"

        def up(db):
            db.execute("ALTER TABLE people DROP COLUMN fname")
            db.execute("UPDATE people SET name = 'x' WHERE id = ?", (1,))
        """,
    )
    violations = lint_migration(discover(tmp_path)[0], "sqlite")
    assert [(v.rule, v.line) for v in violations] == [("drop-column", 4)]


def test_up_refuses_a_migration_that_fails_lint(
    db_url: str, mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people_series(mdir)
    add_name_with(mdir, "ALTER TABLE people DROP COLUMN lname;")
    code, _, err = cli(capsys, "up", "--dir", str(mdir), "--database", db_url)
    assert code == 2
    assert "20240102000000_add_name.sql:4: drop-column:" in err and "nothing was run" in err
    assert Runner(mdir, db_url).status()[0].state == "pending"
    code, out, _ = cli(capsys, "lint", "--dir", str(mdir), "--database", db_url, "--json")
    assert code == 1 and [e["rule"] for e in events(out)[:-1]] == ["drop-column"]


def test_unknown_allowed_rule_is_bad_input(mdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(mdir, "20240101000000_x.sql", "-- phase: expand\n-- deployer: allow drop-colum\n-- up\n")
    code, _, err = cli(capsys, "lint", "--dir", str(mdir), "--dialect", "sqlite")
    assert code == 2 and "20240101000000_x.sql:2" in err and "drop-colum" in err


# -- files, CLI input ---------------------------------------------------------------------


def test_new_writes_stamped_files_that_lint_clean(
    mdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "new", "add-people-name", "--dir", str(mdir))
    assert code == 0 and out.strip().endswith("_add_people_name.sql")
    code, out, _ = cli(
        capsys, "new", "backfill_name", "--py", "--phase", "expand", "--dir", str(mdir), "--json"
    )
    created = Path(events(out)[0]["path"])
    assert created.suffix == ".py" and created.exists()
    found = discover(mdir)
    assert [m.phase for m in found] == ["expand", "expand"] and found[1].has_down
    for m in found:
        assert lint_migration(m, "postgresql") == []
    # two files in the same second keep a strict order
    again = new_migration(mdir, "third", "contract", False, now=None)
    assert len({p.name.split("_")[0] for p in mdir.iterdir()}) == 3 and again.exists()


STATUS = ["status", "--dir", "{dir}", "--database", "{db}"]


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [
        ({"2024_bad.sql": ""}, STATUS, "2024_bad.sql: not a migration file name"),
        ({"20240101000000_a.sql": "-- up\nSELECT 1;"}, STATUS, "a.sql: no phase"),
        ({"20240101000000_a.sql": "-- phase: later\n-- up"}, STATUS, "a.sql:1: phase 'later'"),
        ({"20240101000000_a.sql": "-- phase: expand\nSELECT 1;"}, STATUS, "a.sql:2: SQL before"),
        ({"20240101000000_a.py": "phase = 'expand'\ndef up(db) pass"}, STATUS, "a.py:2: Python"),
        ({"20240101000000_a.py": "phase = 'expand'"}, STATUS, "a.py: no `def up(db)`"),
        ({}, ["up", "--to", "nope", *STATUS[1:]], "--to nope: no such migration"),
        ({}, ["up", "--phase", "sideways"], "argument --phase: invalid choice"),
        ({}, ["down", "--steps", "1", "--to", "x"], "not allowed with argument"),
        ({}, ["up", "--dir", "{dir}", "--database", "mysql://x"], "'mysql://x': expected sqlite"),
        ({}, ["status", "--dir", "/nonexistent", "--database", "{db}"], "--dir /nonexistent: no"),
        ({}, ["up", "--dir", "{dir}"], "--database URL is required"),
        ({}, ["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_naming_file_or_option(
    files: dict[str, str],
    args: list[str],
    expected: str,
    mdir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEPLOYER_MIGRATIONS_DATABASE", raising=False)
    for name, text in files.items():
        (mdir / name).write_text(text)
    full = [a.format(dir=mdir, db=f"sqlite:///{tmp_path / 'x.db'}") for a in args]
    code, _, err = cli(capsys, *full)
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_missing_psycopg_is_a_clear_error(mdir: Path) -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from deployer.migrations.cli import main\n"
        f"sys.exit(main(['status', '--dir', {str(mdir)!r}, '--database', 'postgresql://h/db']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2 and "pip install 'psycopg[binary]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreachable_postgres_exits_1_without_password(mdir: Path) -> None:
    url = "postgresql://u:secret@127.0.0.1:1/db?connect_timeout=2"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployer.migrations",
            "status",
            "--dir",
            str(mdir),
            "--database",
            url,
        ],
        capture_output=True,
        text=True,
    )
    assert (
        proc.returncode == 1 and "cannot connect to postgresql://u:***@127.0.0.1:1" in proc.stderr
    )
    assert "secret" not in proc.stderr and "Traceback" not in proc.stderr


def test_sqlite_runs_on_the_standard_library_alone(mdir: Path, tmp_path: Path) -> None:
    people_series(mdir)
    code = (
        "import sys, sysconfig\n"
        "from deployer.migrations.cli import main\n"
        f"assert main(['up', '--dir', {str(mdir)!r}, '--database', "
        f"'sqlite:///{tmp_path / 'app.db'}']) == 0\n"
        "std = sysconfig.get_paths()['stdlib']\n"
        "print(sorted(n for n, m in sys.modules.items() if getattr(m, '__file__', None)"
        " and not m.__file__.startswith(std) and n.split('.')[0] not in"
        " ('deployer', '_distutils_hack') and not n.startswith('__editable__')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_module_help_exits_0() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deployer.migrations", "up", "--help"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "--phase" in proc.stdout and "--dry-run" in proc.stdout


# -- SQL text -----------------------------------------------------------------------------


def test_split_keeps_literals_comments_dollar_quotes_and_trigger_bodies() -> None:
    script = (
        "INSERT INTO t VALUES ('a;b', \"c;d\"); -- x; y\n"
        "/* a; /* nested; */ b; */ SELECT 1;\n"
        "CREATE FUNCTION f() RETURNS int AS $body$ SELECT 1; $body$ LANGUAGE sql;\n"
    )
    pg = split_statements(script, "postgresql")
    assert [s.line for s in pg] == [1, 2, 3]
    assert pg[2].text.endswith("LANGUAGE sql") and "$body$ SELECT 1; $body$" in pg[2].text
    assert pg[0].code == "INSERT INTO T VALUES ('', \"c;d\")"
    trigger = "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 1; END;\nSELECT 2;"
    assert [s.line for s in split_statements(trigger, "sqlite")] == [1, 2]


def test_placeholders_for_psycopg() -> None:
    assert (
        pyformat_placeholders("SELECT '?', 5 % 2 FROM t WHERE a = ? AND b LIKE 'x%'")
        == "SELECT '?', 5 %% 2 FROM t WHERE a = %s AND b LIKE 'x%%'"
    )


def test_bad_input_from_the_api_too(mdir: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="--phase"):
        Runner(mdir, f"sqlite:///{tmp_path / 'x.db'}").up(phase="sideways")


def test_migrate_lint_takes_the_inventorys_migrations(tmp_path: Path) -> None:
    """`deployer migrate lint` as the README runs it: no --database (the inventory's
    database is only reachable from the hosts): its dir and dialect, every file."""
    (tmp_path / "inventory.toml").write_text(
        '[app]\nname = "shop"\ndeploy_to = "/srv/shop"\n'
        '[migrations]\ndir = "db/migrations"\ndatabase = "postgresql://shop@db1.invalid/shop"\n'
        '[hosts.web1]\naddress = "10.0.0.11"\n'
    )
    found = tmp_path / "db" / "migrations"
    found.mkdir(parents=True)
    (found / "20261101000000_create.sql").write_text(
        "-- phase: expand\n-- up\nCREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT);\n"
    )

    def lint() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deployer", "migrate", "lint"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    clean = lint()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "lint: every file in db/migrations/ for postgresql" in clean.stderr
    (found / "20261102000000_drop.sql").write_text(
        "-- phase: expand\n-- up\nALTER TABLE people DROP COLUMN name;\n"
    )
    unsafe = lint()
    assert unsafe.returncode == 1, unsafe.stdout + unsafe.stderr
    assert "20261102000000_drop" in unsafe.stdout and "required" not in unsafe.stderr
