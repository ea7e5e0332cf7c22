"""Chunked backfill of 1M rows on PostgreSQL while a reader and a writer keep running.

Runs the example series (examples/migrations): the v1 table is created and
filled with --rows rows, then `python -m deployer.migrations up --phase
expand` (a real runner process) adds `name` and backfills it 1000 rows per
committed chunk. Meanwhile app v1 keeps serving, as it does during a rollout:
one writer (UPDATE of one row by id, half of them aimed just ahead of the
backfill's progress, where the chunk in flight holds its row locks) and one
reader (SELECT by id), each on its own connection. Reported: backfill rows/s,
and the writer's and reader's longest statement time, an upper bound on the
longest lock wait they saw (target <= 100 ms), with a quiet baseline.

    python bench/migrations_backfill.py [--rows 1000000] [--repeat 3] [--database URL]
        [--write-results]

Without --database each run creates a throwaway database on the machine's
server (as tests/pg_helpers.py does) and drops it afterwards; with --database
each run drops the tables `people` and `deployer_migrations` there first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
MIGRATIONS = REPO / "examples" / "migrations" / "migrations"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Migrations"
TARGET_MS = 100.0
Statement = Callable[[psycopg.Connection], None]


@dataclass
class Load:
    """Statement latencies of one concurrent client."""

    name: str
    latencies_ms: list[float] = field(default_factory=list)
    backend_pid: int = 0
    lock_waits_ms: dict[str, float] = field(default_factory=dict)  # server-side, by waitstart
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        if not self.latencies_ms:
            return f"{self.name}: no statements"
        lat = sorted(self.latencies_ms)
        p99 = lat[int(len(lat) * 0.99) - 1] if len(lat) >= 100 else lat[-1]
        return (
            f"{self.name}: {len(lat)} statements, median {statistics.median(lat):.2f} ms, "
            f"p99 {p99:.2f} ms, max {lat[-1]:.1f} ms; lock waits (pg_locks) "
            f"{len(self.lock_waits_ms)}, longest {self.max_lock_wait_ms:.1f} ms"
            f"{self.longest_on()}; "
            f"errors {len(self.errors)}" + (f" (first: {self.errors[0]})" if self.errors else "")
        )

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    def longest_on(self) -> str:
        if not self.lock_waits_ms:
            return ""
        key = max(self.lock_waits_ms, key=self.lock_waits_ms.__getitem__)
        return f" (on a {key.split()[0]} lock)"

    @property
    def max_lock_wait_ms(self) -> float:
        return max(self.lock_waits_ms.values(), default=0.0)


def sample_lock_waits(url: str, loads: tuple[Load, ...], stop: threading.Event) -> None:
    """What the server says: pg_locks.waitstart of every lock a client waits for,
    sampled every 2 ms; a wait's length is its last sighting minus its start."""
    by_pid = {load.backend_pid: load for load in loads}
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            rows = conn.execute(
                "SELECT pid, locktype || ' ' || waitstart::text,"
                " extract(epoch FROM clock_timestamp() - waitstart)"
                " FROM pg_locks WHERE NOT granted AND waitstart IS NOT NULL AND pid = ANY(%s)",
                (list(by_pid),),
            ).fetchall()
            for pid, start, seconds in rows:
                waits = by_pid[pid].lock_waits_ms
                waits[start] = max(waits.get(start, 0.0), float(seconds) * 1000)
            time.sleep(0.002)


class Frontier:
    """The last id the backfill committed, as its JSON events report it."""

    def __init__(self) -> None:
        self.value = 0


def run_client(url: str, load: Load, stop: threading.Event, statement: Statement) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        load.backend_pid = conn.info.backend_pid
        while not stop.is_set():
            start = time.perf_counter()
            try:
                statement(conn)
            except psycopg.Error as e:
                load.errors.append(str(e).strip())
            load.latencies_ms.append((time.perf_counter() - start) * 1000)


def writer(rows: int, frontier: Frontier) -> Statement:
    """App v1's rename: old code keeps writing the old columns during the whole expand."""

    def rename(conn: psycopg.Connection) -> None:
        if random.random() < 0.5:  # just ahead of the backfill: in the chunk being written
            pid = min(rows, frontier.value + random.randint(1, 2000))
        else:
            pid = random.randint(1, rows)
        conn.execute("UPDATE people SET fname = %s, lname = %s WHERE id = %s", ("A", "B", pid))

    return rename


def reader(rows: int) -> Statement:
    def read(conn: psycopg.Connection) -> None:
        sql = "SELECT id, fname, lname FROM people WHERE id = %s"  # app v1's read
        conn.execute(sql, (random.randint(1, rows),)).fetchone()

    return read


@contextmanager
def clients(url: str, rows: int, frontier: Frontier) -> Iterator[tuple[Load, Load]]:
    stop = threading.Event()
    loads = (Load("writer"), Load("reader"))
    statements = (writer(rows, frontier), reader(rows))
    threads = [
        threading.Thread(target=run_client, args=(url, load, stop, st))
        for load, st in zip(loads, statements, strict=True)
    ]
    for t in threads:
        t.start()
    while not all(load.backend_pid for load in loads):
        time.sleep(0.01)
    sampler = threading.Thread(target=sample_lock_waits, args=(url, loads, stop))
    sampler.start()
    threads.append(sampler)
    try:
        yield loads
    finally:
        stop.set()
        for t in threads:
            t.join()


def migrate(url: str, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "deployer.migrations", *args, "--json"]
    cmd += ["--dir", str(MIGRATIONS), "--database", url]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)


def create_v1_table(url: str, rows: int) -> None:
    done = migrate(url, "up", "--to", "create_people")
    done.communicate()
    assert done.returncode == 0, "creating the v1 table failed"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO people (fname, lname) SELECT 'First' || i, 'Last' || i"
            " FROM generate_series(1, %s) i",
            (rows,),
        )
        conn.execute("VACUUM ANALYZE people")


def backfill(url: str, frontier: Frontier) -> tuple[float, int, list[dict]]:
    """Run expand in a runner process; (seconds of backfill, chunks, events)."""
    proc = migrate(url, "up", "--phase", "expand")
    assert proc.stdout is not None
    events, first_chunk, last_chunk = [], None, None
    for line in proc.stdout:
        event = json.loads(line)
        events.append(event)
        if event["event"] == "start" and "backfill" in event["name"]:
            first_chunk = time.perf_counter()
        if event["event"] == "chunk":
            frontier.value = event["progress"]
            last_chunk = time.perf_counter()
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"migration failed: {events[-1]}")
    chunks = sum(e["event"] == "chunk" for e in events)
    return (last_chunk or 0) - (first_chunk or 0), chunks, events


def baseline(url: str, rows: int, seconds: float) -> tuple[Load, Load]:
    frontier = Frontier()
    frontier.value = random.randint(1, rows)
    with clients(url, rows, frontier) as loads:
        time.sleep(seconds)
    return loads


@dataclass
class Result:
    rows_per_s: float
    lock_wait_ms: float
    lines: list[str]


def run(url: str, rows: int, quiet_seconds: float) -> Result:
    create_v1_table(url, rows)
    quiet = baseline(url, rows, quiet_seconds)
    frontier = Frontier()
    with clients(url, rows, frontier) as (w, r):
        seconds, chunks, _ = backfill(url, frontier)
    with psycopg.connect(url) as conn:
        nulls = conn.execute("SELECT count(*) FROM people WHERE name IS NULL").fetchone()[0]
    worst_wait = max(w.max_lock_wait_ms, r.max_lock_wait_ms)
    return Result(
        rows / seconds,
        worst_wait,
        [
            f"- backfill: {rows} rows in {chunks} chunks of 1000, {seconds:.1f} s, "
            f"**{rows / seconds:,.0f} rows/s**; rows left without a name: {nulls}; "
            f"longest lock wait: **{worst_wait:.1f} ms** (load average "
            f"{os.getloadavg()[0]:.1f})",
            f"  - during the expand, {w.line()}",
            f"  - during the expand, {r.line()}",
            f"  - quiet baseline ({quiet_seconds:g} s, no migration), {quiet[0].line()}",
            f"  - quiet baseline, {quiet[1].line()}",
        ],
    )


def summary(results: list[Result], url: str) -> list[str]:
    speeds = sorted(r.rows_per_s for r in results)
    waits = [r.lock_wait_ms for r in results]
    verdict = "meets" if max(waits) <= TARGET_MS else "MISSES"
    return [
        f"- {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, PostgreSQL "
        f"{server_version(url)}, {os.cpu_count()} cores shared with other sessions' tests",
        f"- {len(results)} run(s): **{statistics.median(speeds):,.0f} rows/s** median "
        f"(min {speeds[0]:,.0f}, max {speeds[-1]:,.0f})",
        f"- longest lock wait the concurrent writer/reader saw, per run: "
        f"{', '.join(f'{w:.1f}' for w in waits)} ms; worst **{max(waits):.1f} ms**: {verdict} "
        f"the <= {TARGET_MS:.0f} ms target",
        "- lock waits are server-side (pg_locks.waitstart, sampled every 2 ms); a client's "
        "whole statement time also counts CPU scheduling on the shared machine (its max is "
        "shown per client below)",
    ]


def server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SHOW server_version").fetchone()[0].split()[0]


@contextmanager
def database(url: str | None) -> Iterator[str]:
    if url:
        with psycopg.connect(url, autocommit=True) as conn:  # a fresh start for each run
            conn.execute("DROP TABLE IF EXISTS people, deployer_migrations")
        yield url
        return
    sys.path.insert(0, str(REPO / "tests"))
    from pg_helpers import temporary_database

    with temporary_database("deployer_bench") as temp:
        yield temp


def write_results(lines: list[str], command: str) -> None:
    """Replace only the "## Migrations" section; other sections belong to others."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = "\n".join([HEADING, "", f"`{command}`", "", *lines, ""]) + "\n"
    start = text.find(HEADING)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[nxt + 1 :] if nxt >= 0 else "")
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database", help="postgresql://... (default: a throwaway database)")
    parser.add_argument("--quiet-seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs, each on a fresh table")
    parser.add_argument("--write-results", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()
    results = []
    for _ in range(args.repeat):
        with database(args.database) as url:
            results.append(run(url, args.rows, args.quiet_seconds))
            lines = summary(results, url) if len(results) == args.repeat else []
    lines += [line for r in results for line in r.lines]
    print("\n".join(lines))
    if args.write_results:
        command = f"python bench/migrations_backfill.py --rows {args.rows} --repeat {args.repeat}"
        write_results(lines, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
