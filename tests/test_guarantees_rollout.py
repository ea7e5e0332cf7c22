"""What a rollout and a rollback promise about the hosts, checked on the hosts.

Real sshd hosts, real git, real `deployer` processes. Every assertion reads the
hosts' state (the release `current` points to, the revision it holds, the lock
directories, the schema) or what the hosts did (which host asked the health
endpoint while running which revision), never the tool's wording.

Each test here is the one that fails when one promise breaks; bench/break_it.py
breaks them one at a time and checks that it does.
"""

from __future__ import annotations

import http.server
import json
import os
import pwd
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rollout_helpers import Project, commit, git, make_project
from sshd import SSHTestHost

APP = {"app.txt": "version 1\n"}


class FleetHealth:
    """One health endpoint for every host: `[health] url` ends in `/{host}`, so
    each probe says which host made it. `rule(host)` decides the status; every
    probe is recorded with the revision the probing host ran at that moment."""

    def __init__(self, project: Project, rule: Callable[[str], int]) -> None:
        self.hits: list[tuple[str, str | None]] = []
        by_name = {h.name: h for h in project.hosts}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                host = self.path.rsplit("/", 1)[-1]
                outer.hits.append((host, project.revision(by_name[host])))
                self.send_response(rule(host))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{{host}}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def probed(self, host: str, revision: str) -> bool:
        """Did `host` ask for its health while it ran `revision`?"""
        return (host, revision) in self.hits

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def configure(project: Project, text: str) -> None:
    """Add TOML sections to the inventory (before [ssh])."""
    inv = project.inventory.read_text().replace("[ssh]", f"{text}\n[ssh]", 1)
    project.inventory.write_text(inv)


def health_section(url: str) -> str:
    return f'[health]\nurl = "{url}"\ntimeout = 2\npasses = 1\ninterval = 0.1\n'


@pytest.fixture
def project(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> Project:
    p = make_project(tmp_path, ssh_hosts, APP)
    p.deployer("setup", check=True)
    return p


def revisions(project: Project) -> dict[str, str | None]:
    return {h.name: project.revision(h) for h in project.hosts}


# --- rollout ---------------------------------------------------------------------------


def test_host_failing_its_switch_within_max_failed_goes_back_to_its_old_release(
    project: Project,
) -> None:
    v1 = git(project.repo, "rev-parse", "HEAD")
    project.deployer("rollout", check=True)
    v2 = commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    host1, host2, host3 = (h.name for h in project.hosts)
    old = project.current(project.hosts[1])
    health = FleetHealth(project, lambda host: 503 if host == host2 else 200)
    try:
        configure(
            project,
            health_section(health.url)
            + "[rollout]\ncanary = 1\nbatch = 1\nwatch = 0\nmax_failed = 1\n",
        )
        proc = project.deployer("rollout")
    finally:
        health.close()
    assert proc.returncode == 0, proc.stdout  # one failure is tolerated
    assert health.probed(host2, v2)  # host2 was switched, and failed its health check
    assert revisions(project) == {host1: v2, host2: v1, host3: v2}
    assert project.current(project.hosts[1]) == old


def test_on_failure_halt_stops_where_it_is(project: Project) -> None:
    v1 = git(project.repo, "rev-parse", "HEAD")
    project.deployer("rollout", check=True)
    v2 = commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    host1, host2, host3 = (h.name for h in project.hosts)
    health = FleetHealth(project, lambda host: 503 if host == host1 else 200)
    try:
        configure(
            project,
            health_section(health.url)
            + '[rollout]\ncanary = 1\nbatch = 1\nwatch = 0\non_failure = "halt"\n',
        )
        proc = project.deployer("rollout")
    finally:
        health.close()
    assert proc.returncode == 1, proc.stdout
    # The failed canary is left on the new release for the operator to look at;
    # the batches after it never started.
    assert revisions(project) == {host1: v2, host2: v1, host3: v1}
    assert {h for h, _ in health.hits} == {host1}


def test_later_batch_failing_health_rolls_earlier_batches_back(project: Project) -> None:
    v1 = git(project.repo, "rev-parse", "HEAD")
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    v2 = commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    host1, host2, host3 = (h.name for h in project.hosts)
    health = FleetHealth(project, lambda host: 503 if host == host3 else 200)
    try:
        configure(
            project, health_section(health.url) + "[rollout]\ncanary = 1\nbatch = 1\nwatch = 0\n"
        )
        proc = project.deployer("rollout")
    finally:
        health.close()
    assert proc.returncode == 1, proc.stdout
    # host1 and host2 were switched and healthy on v2 before host3 failed...
    assert health.probed(host1, v2) and health.probed(host2, v2) and health.probed(host3, v2), (
        health.hits,
        v2,
        proc.stdout,
    )
    # ...and all three are back where they were.
    assert revisions(project) == {host1: v1, host2: v1, host3: v1}
    assert {h.name: project.current(h) for h in project.hosts} == before


# --- rollback --------------------------------------------------------------------------


def test_rollback_halts_at_a_host_that_fails(project: Project) -> None:
    v1 = git(project.repo, "rev-parse", "HEAD")
    project.deployer("rollout", check=True)
    v2 = commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    project.deployer("rollout", check=True)
    host1, host2, host3 = (h.name for h in project.hosts)
    # The release to go back to fails its health check on host2 only.
    health = FleetHealth(
        project,
        lambda host: 503 if host == host2 and project.revision(project.hosts[1]) == v1 else 200,
    )
    try:
        configure(
            project, health_section(health.url) + "[rollout]\ncanary = 1\nbatch = 1\nwatch = 0\n"
        )
        proc = project.deployer("rollback")
    finally:
        health.close()
    assert health.probed(host2, v1)  # host2 was switched back, and failed
    # host1 went back; host2 returned to where it was; host3 was never touched.
    assert revisions(project) == {host1: v1, host2: v2, host3: v2}
    assert host3 not in {h for h, _ in health.hits}
    assert proc.returncode == 1, proc.stdout


# --- migrations ------------------------------------------------------------------------

CREATE = {
    "migrations/20240101000000_create.sql": "-- phase: expand\n-- up\n"
    "CREATE TABLE people (id INTEGER PRIMARY KEY, fname TEXT);\n-- down\nDROP TABLE people;\n",
}
SPLIT = {
    "migrations/20240102000000_add_name.sql": "-- phase: expand\n-- up\n"
    "ALTER TABLE people ADD COLUMN name TEXT;\n-- down\nALTER TABLE people DROP COLUMN name;\n",
    "migrations/20240103000000_drop_fname.sql": "-- phase: contract\n-- up\n"
    "ALTER TABLE people DROP COLUMN fname;\n-- down\nALTER TABLE people ADD COLUMN fname TEXT;\n",
}


def people_columns(project: Project) -> list[str]:
    db = project.hosts[0].root / "shared" / "app.sqlite3"
    return [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(people)")]


def test_deferred_contract_migrations_run_at_the_start_of_the_next_rollout(
    project: Project,
) -> None:
    migrations = '[migrations]\ndatabase = "sqlite:///app.sqlite3"\n'
    configure(project, migrations)
    commit(project.repo, CREATE, "schema")
    project.deployer("rollout", check=True)  # the table, with contract = "after-rollout"
    inv = project.inventory.read_text().replace(
        migrations, migrations + 'contract = "next-rollout"\n'
    )
    project.inventory.write_text(inv)
    commit(project.repo, SPLIT, "split fname")
    project.deployer("rollout", check=True)
    # Deferred: the release before stays a safe rollback target until the next rollout.
    assert people_columns(project) == ["id", "fname", "name"]
    v3 = commit(project.repo, {"app.txt": "version 3\n"}, "v3")
    project.deployer("rollout", check=True)
    assert people_columns(project) == ["id", "name"]
    assert set(revisions(project).values()) == {v3}


def test_first_rollout_with_contract_next_rollout(project: Project) -> None:
    configure(
        project, '[migrations]\ndatabase = "sqlite:///app.sqlite3"\ncontract = "next-rollout"\n'
    )
    commit(project.repo, CREATE, "schema")
    project.deployer("rollout", check=True)
    assert people_columns(project) == ["id", "fname"]


# --- locks -----------------------------------------------------------------------------


def plant_lock(path: Path, owner_uid: int, heartbeat_age: float, directory: bool) -> None:
    """A lock held by a controller on another machine (its pid cannot be checked
    from here), whose last heartbeat was `heartbeat_age` seconds ago."""
    owner = {
        "id": "0123456789ab",
        "app": "demo",
        "revision": "f" * 40,
        "action": "rollout",
        "user": "alice",
        "controller": "build-elsewhere",
        "pid": 1,
        "since": "2026-01-01T00:00:00+00:00",
    }
    info = path / "owner.json" if directory else path
    if directory:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, owner_uid, -1)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps(owner))
    os.chown(info, owner_uid, -1)
    beat = time.time() - heartbeat_age
    os.utime(info, (beat, beat))


def test_a_lock_whose_heartbeat_is_too_old_is_stale_and_unlock_breaks_it(
    project: Project,
) -> None:
    from deployer.lock import STALE_AFTER_S

    uid = pwd.getpwnam(project.hosts[0].user).pw_uid
    host_lock = project.hosts[0].root / "run" / "deploy.lock"
    controller_lock = project.state / "demo.lock"
    # Alive: a heartbeat a few seconds old. Neither lock may be broken without --force.
    plant_lock(host_lock, uid, 5, directory=True)
    plant_lock(controller_lock, os.getuid(), 5, directory=False)
    assert project.deployer("unlock").returncode == 3
    assert project.deployer("rollout").returncode == 3
    assert host_lock.is_dir() and controller_lock.exists()
    # Gone: no heartbeat for longer than STALE_AFTER_S. `unlock` breaks both, and
    # the next rollout goes through.
    plant_lock(host_lock, uid, STALE_AFTER_S + 60, directory=True)
    plant_lock(controller_lock, os.getuid(), STALE_AFTER_S + 60, directory=False)
    assert project.deployer("unlock").returncode == 0
    assert not host_lock.exists() and not controller_lock.exists()
    project.deployer("rollout", check=True)
