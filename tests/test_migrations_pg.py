"""PostgreSQL-only behaviour, on the machine's real server: CONCURRENTLY outside a
transaction, the INVALID index a failed one leaves, lock_timeout retries, the
safe alternatives lint recommends, and the example series with both app versions."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pg_helpers
import psycopg
import pytest
from test_migrations import LINT_CASES, case_file, write

from deployer.migrations import Runner
from deployer.migrations.errors import MigrationFailed

# The PostgreSQL fixtures, registered in this module.
pg_database = pg_helpers.pg_database
pg_url = pg_helpers.pg_url

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "migrations"


@pytest.fixture
def mdir(tmp_path: Path) -> Path:
    d = tmp_path / "migrations"
    d.mkdir()
    return d


def people(url: str, count: int = 3) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE people (id int PRIMARY KEY, fname text, lname text)")
        conn.execute(
            "INSERT INTO people SELECT i, 'f', 'l' || i FROM generate_series(1, %s) i", (count,)
        )


def index_state(url: str, name: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)
        ).fetchall()


CONCURRENT_INDEX = """
-- phase: expand
-- transaction: none
-- up
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS people_lname ON people (lname);
-- down
DROP INDEX CONCURRENTLY IF EXISTS people_lname;
"""


def test_concurrent_index_outside_a_transaction(pg_url: str, mdir: Path) -> None:
    people(pg_url)
    write(mdir, "20240101000000_people_lname.sql", CONCURRENT_INDEX)
    runner = Runner(mdir, pg_url)
    assert runner.up() == ["20240101000000_people_lname"]
    assert index_state(pg_url, "people_lname") == [(True,)]
    assert runner.down() == ["20240101000000_people_lname"]
    assert index_state(pg_url, "people_lname") == []


def test_failed_concurrent_index_leaves_no_invalid_index(pg_url: str, mdir: Path) -> None:
    people(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE people SET lname = 'same'")  # the unique index cannot be built
    write(mdir, "20240101000000_people_lname.sql", CONCURRENT_INDEX)
    with pytest.raises(MigrationFailed, match="could not create unique index"):
        Runner(mdir, pg_url).up()
    # CREATE INDEX CONCURRENTLY leaves an INVALID index behind when it fails; with IF NOT
    # EXISTS a retry would then silently keep it. The runner drops it.
    assert index_state(pg_url, "people_lname") == []
    assert Runner(mdir, pg_url).status()[0].state == "pending"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE people SET lname = 'l' || id")
    assert Runner(mdir, pg_url).up() == ["20240101000000_people_lname"]
    assert index_state(pg_url, "people_lname") == [(True,)]


def hold_table_lock(url: str, seconds: float) -> tuple[threading.Thread, threading.Event]:
    """Another session holding ACCESS EXCLUSIVE on people for `seconds`."""
    locked = threading.Event()

    def hold() -> None:
        with psycopg.connect(url) as conn:
            conn.execute("LOCK TABLE people IN ACCESS EXCLUSIVE MODE")
            locked.set()
            threading.Event().wait(seconds)

    thread = threading.Thread(target=hold)
    thread.start()
    locked.wait(10)
    return thread, locked


ADD_COLUMN = "-- phase: expand\n-- up\nALTER TABLE people ADD COLUMN name text;\n"


def test_lock_timeout_gives_up_then_retries(pg_url: str, mdir: Path) -> None:
    people(pg_url)
    write(mdir, "20240101000000_add_name.sql", ADD_COLUMN)
    seen: list[dict[str, Any]] = []
    holder, _ = hold_table_lock(pg_url, 0.6)
    runner = Runner(mdir, pg_url, lock_timeout=0.2, retries=5, on_event=seen.append)
    assert runner.up() == ["20240101000000_add_name"]
    holder.join()
    retries = [e for e in seen if e["event"] == "retry"]
    assert retries and "SQLSTATE 55P03" in retries[0]["error"]


def test_lock_timeout_without_retries_fails_cleanly(pg_url: str, mdir: Path) -> None:
    people(pg_url)
    write(mdir, "20240101000000_add_name.sql", ADD_COLUMN)
    holder, _ = hold_table_lock(pg_url, 0.5)
    with pytest.raises(MigrationFailed, match="lock timeout"):
        Runner(mdir, pg_url, lock_timeout=0.1, retries=0).up()
    holder.join()
    assert Runner(mdir, pg_url).status()[0].state == "pending"


def test_the_safe_alternatives_lint_recommends_run_on_postgresql(pg_url: str, mdir: Path) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE teams (id int PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE people (id int PRIMARY KEY, fname text, lname text, name text,"
            " team_id int)"
        )
        conn.execute("CREATE TABLE sessions (id int PRIMARY KEY, expires_at timestamptz)")
    cases = [c for c in LINT_CASES if c[1] == "postgresql"]
    for i, (rule, _, phase, _, good) in enumerate(cases):
        case_file(mdir / f"2024010100{i:04d}_{rule.replace('-', '_')}.sql", phase, good)
    applied = Runner(mdir, pg_url).up()
    assert len(applied) == len(cases)


def test_example_series_keeps_both_app_versions_working(pg_url: str) -> None:
    import importlib.util

    def load(name: str) -> Any:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    v1, v2 = load("app_v1"), load("app_v2")
    migrations = EXAMPLE / "migrations"
    runner = Runner(migrations, pg_url)
    assert runner.up(to="create_people") == ["20240601000000_create_people"]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO people (fname, lname) SELECT 'Ada', 'Lovelace' || i"
            " FROM generate_series(1, 2500) i"
        )
        old = v1.create(conn, "Alan Turing")

        seen: list[dict[str, Any]] = []
        Runner(migrations, pg_url, on_event=seen.append).up(phase="expand")
        assert sum(e["event"] == "chunk" for e in seen) == 3  # 2501 rows, 1000 a chunk

        # mid-rollout: both versions serve, each reads what the other wrote
        late_v1 = v1.create(conn, "Grace Hopper")  # after the backfill: name stays NULL
        new = v2.create(conn, "Barbara Liskov")
        assert v1.get(conn, old)["name"] == v2.get(conn, old)["name"] == "Alan Turing"
        assert v2.get(conn, late_v1)["name"] == "Grace Hopper"
        assert v2.get(conn, new)["name"] == "Barbara Liskov"
        v1.rename(conn, old, "Alan M. Turing")

        assert runner.up(phase="contract") == ["20240602000200_drop_people_fname_lname"]
        assert v2.get(conn, late_v1)["name"] == "Grace Hopper"  # caught up by the contract
        assert v2.get(conn, 1)["name"] == "Ada Lovelace1"
        with pytest.raises(psycopg.errors.UndefinedColumn):
            v1.get(conn, old)  # why contract waits until no host runs v1
        nulls = conn.execute("SELECT count(*) FROM people WHERE name IS NULL").fetchone()
        assert nulls == (0,)


def test_example_expand_down_restores_the_v1_schema(pg_url: str) -> None:
    migrations = EXAMPLE / "migrations"
    runner = Runner(migrations, pg_url)
    runner.up(phase="expand")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO people (name) VALUES ('Barbara Liskov')")  # as v2 would
        assert runner.down(steps=2, phase="expand") == [
            "20240602000100_backfill_people_name",
            "20240602000000_add_people_name",
        ]
        rows = conn.execute("SELECT fname, lname FROM people").fetchall()
        assert rows == [("Barbara", "Liskov")]
        with pytest.raises(psycopg.errors.NotNullViolation):  # v1's constraints are back
            conn.execute("INSERT INTO people (fname) VALUES (NULL)")


def test_example_lints_clean() -> None:
    from deployer.migrations.files import discover
    from deployer.migrations.lint import lint

    assert lint(discover(EXAMPLE / "migrations"), "postgresql") == []


def test_backfill_chunks_commit_without_waiting_for_the_disk(pg_url: str, mdir: Path) -> None:
    people(pg_url, count=3)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE seen (setting text)")
    write(
        mdir,
        "20240101000000_chunks.py",
        """
        phase = "expand"

        def up(db):
            for lo, hi in db.batches("people", size=1):
                db.execute("INSERT INTO seen VALUES (current_setting('synchronous_commit'))")
                yield hi
        """,
    )
    Runner(mdir, pg_url).up()
    with psycopg.connect(pg_url) as conn:
        # row locks are released without a WAL flush wait; the final "applied" commit is durable
        assert conn.execute("SELECT setting FROM seen").fetchall() == [("off",)] * 3
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
