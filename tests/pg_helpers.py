"""The machine's real PostgreSQL server for tests: a role, throwaway databases, fixtures.

Administrative statements run through `psql` as the `postgres` superuser (peer
authentication over the unix socket); the tests themselves connect over TCP
as a role of their own with a password, like an application would. Nothing is
skipped when the server is down: CI starts it, and a silent skip would hide
that the PostgreSQL tests never ran.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ROLE = "deployer_test"
PASSWORD = "deployer_test"
HOST = os.environ.get("DEPLOYER_TEST_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("DEPLOYER_TEST_PG_PORT", "5432"))


def psql_admin(sql: str, database: str = "postgres") -> str:
    """Run SQL as the postgres superuser; fails the test with psql's message."""
    as_postgres = (
        ["runuser", "-u", "postgres", "--"]
        if os.geteuid() == 0
        else ["sudo", "-n", "-u", "postgres"]
    )
    if shutil.which("psql") is None:
        pytest.fail("psql not found: the PostgreSQL tests need the machine's PostgreSQL 15")
    proc = subprocess.run(
        [
            *as_postgres,
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            database,
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        cwd="/",
    )
    if proc.returncode != 0:
        pytest.fail(
            f"psql as postgres failed ({proc.stderr.strip()}); is the cluster running? "
            "`pg_ctlcluster 15 main start` (as root; .ci/run does it)"
        )
    return proc.stdout


def ensure_role() -> None:
    # Idempotent, and safe when another test session creates it at the same moment.
    psql_admin(
        "DO $$ BEGIN "
        f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{PASSWORD}'; "
        "EXCEPTION WHEN duplicate_object OR unique_violation THEN "
        f"ALTER ROLE {ROLE} LOGIN CREATEDB PASSWORD '{PASSWORD}'; END $$"
    )


def url_for(database: str) -> str:
    return f"postgresql://{ROLE}:{PASSWORD}@{HOST}:{PORT}/{database}"


@contextmanager
def temporary_database(prefix: str = "deployer_test") -> Iterator[str]:
    """A new database owned by the test role; dropped (connections and all) afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    assert re.fullmatch(r"\w+", name)
    ensure_role()
    psql_admin(f"CREATE DATABASE {name} OWNER {ROLE}")
    try:
        yield url_for(name)
    finally:
        psql_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def reset_schema(url: str) -> None:
    """Empty the public schema (faster than a new database per test)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """One database for the test session (URL); tests get it emptied through `pg_url`."""
    with temporary_database() as url:
        yield url


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """URL of a PostgreSQL database with an empty public schema."""
    reset_schema(pg_database)
    return pg_database
