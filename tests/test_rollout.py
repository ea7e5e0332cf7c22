"""Rollout, rollback, status, history and locks over real SSH (no master here)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from rollout_helpers import Project, commit, git, make_project
from sshd import SSHTestHost

APP = {"app.txt": "version 1\n", "lib/util.txt": os.urandom(5000).hex() + "\n"}  # incompressible


@pytest.fixture
def project(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> Project:
    p = make_project(tmp_path, ssh_hosts, APP, app_extra='build = "cat app.txt > built.txt"')
    p.deployer("setup", check=True)
    return p


def test_rollout_then_rollback(project: Project) -> None:
    sha1 = git(project.repo, "rev-parse", "HEAD")
    v1 = project.deployer("rollout", check=True)
    assert "rollout ok" in v1.stdout
    for h in project.hosts:
        assert project.revision(h) == sha1
        assert (h.root / "current" / "built.txt").read_text() == "version 1\n"
    sha2 = commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    project.deployer("rollout", check=True)
    for h in project.hosts:
        assert project.revision(h) == sha2
    back = project.deployer("rollback", check=True)
    assert "rollback ok" in back.stdout
    for h in project.hosts:
        assert project.revision(h) == sha1
    history = json.loads(project.deployer("history", "--json", check=True).stdout)
    assert [e["action"] for e in history] == ["rollback", "rollout", "rollout"]
    assert all(e["result"] == "ok" for e in history)
    host_history = (project.hosts[0].root / "history.jsonl").read_text().splitlines()
    assert len(host_history) == 3


def test_dry_run_changes_nothing(project: Project) -> None:
    out = project.deployer("rollout", "--dry-run", check=True).stdout
    assert "switch canary batch: host1 ->" in out
    for h in project.hosts:
        assert project.current(h) is None and project.releases(h) == []


def test_build_failure_switches_nothing(project: Project) -> None:
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    inv = project.inventory.read_text().replace(
        'build = "cat app.txt > built.txt"', 'build = "echo compiling; exit 3"'
    )
    project.inventory.write_text(inv)
    proc = project.deployer("rollout")
    assert proc.returncode == 1
    assert "FAILED at prepare" in proc.stdout and "exited with 3" in proc.stdout
    assert "compiling" in proc.stdout
    assert {h.name: project.current(h) for h in project.hosts} == before


def test_delta_sync_sends_less_the_second_time(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    """Counted on the wire, as the hosts receive it: a relay in front of each sshd."""
    import dataclasses
    import zlib

    from guarantee_helpers import CountingProxy

    proxies = [CountingProxy(h.address, h.port) for h in ssh_hosts]
    try:
        known = tmp_path / "known_hosts_via_proxies"
        known.write_text(
            "".join(
                f"[{h.address}]:{p.port} {h.host_public_key}\n"
                for h, p in zip(ssh_hosts, proxies, strict=True)
            )
        )
        hosts = [
            dataclasses.replace(h, port=p.port, known_hosts=known)
            for h, p in zip(ssh_hosts, proxies, strict=True)
        ]
        big = os.urandom(100_000).hex()  # incompressible beyond hex: ~100 KB as zlib packs it
        p = make_project(tmp_path, hosts, {**APP, "lib/big.txt": big})
        p.deployer("setup", check=True)
        for proxy in proxies:
            proxy.take()
        p.deployer("rollout", check=True)
        first = [proxy.take() for proxy in proxies]
        commit(p.repo, {"app.txt": "version 2\n"}, "v2")
        p.deployer("rollout", check=True)
        second = [proxy.take() for proxy in proxies]
    finally:
        for proxy in proxies:
            proxy.close()
    packed = len(zlib.compress(big.encode()))
    # The first deploy carries the tree, big file included; the second carries
    # the same commands and only the changed blob and trees: the file never again.
    assert all(b > packed for b in first), (first, packed)
    assert all(b2 < b1 - 0.9 * packed for b1, b2 in zip(first, second, strict=True)), (
        first,
        second,
        packed,
    )


def test_keep_releases_prunes_but_keeps_current_and_previous(project: Project) -> None:
    inv = project.inventory.read_text().replace('name = "demo"', 'name = "demo"\nkeep_releases = 2')
    project.inventory.write_text(inv)
    for i in range(4):
        commit(project.repo, {"app.txt": f"version {i}\n"}, f"v{i}")
        project.deployer("rollout", check=True)
    for h in project.hosts:
        releases = project.releases(h)
        assert len(releases) == 2 and project.current(h) == releases[-1]


def test_second_rollout_is_refused_while_the_lock_is_held(project: Project) -> None:
    from deployer.lock import ControllerLock, Owner

    lock = ControllerLock(project.state, "demo")
    owner = Owner("demo", "abc1234", user="alice")
    lock.acquire(owner)
    proc = project.deployer("rollout")
    assert proc.returncode == 3
    assert "held by alice@" in proc.stderr and "since" in proc.stderr
    lock.release(owner)
    assert project.deployer("rollout").returncode == 0


def test_status_shows_each_host(project: Project) -> None:
    project.deployer("rollout", check=True)
    rows = json.loads(project.deployer("status", "--json", check=True).stdout)
    assert [r["host"] for r in rows] == [h.name for h in project.hosts]
    assert all(r["revision"] == git(project.repo, "rev-parse", "HEAD") for r in rows)


def failure_of(out: str, host: str) -> str:
    """Why `host` failed, from the summary a failed command ends with: one
    `  <host>: <why>` line per failed host (only there is a host name followed
    by a colon)."""
    whys = [line.split(f"  {host}: ", 1)[1] for line in out.splitlines() if f"  {host}: " in line]
    assert whys, f"no failure line for {host}:\n{out}"
    return whys[-1]


class HealthServer:
    """A health endpoint on loopback whose answers the test controls."""

    def __init__(self, on_request=None, status=lambda: 200) -> None:
        import http.server
        import threading

        self.status = status
        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                outer.hits += 1
                if on_request is not None:
                    on_request(outer.hits)
                self.send_response(outer.status())
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def with_health(project: Project, url: str, extra: str = "") -> None:
    text = project.inventory.read_text()
    text = text.replace(
        "[ssh]",
        f'[health]\nurl = "{url}"\ntimeout = 2\npasses = 1\ninterval = 0.2\n'
        f"[rollout]\ncanary = 1\nbatch = 1\nwatch = 0\n{extra}\n[ssh]",
        1,
    )
    project.inventory.write_text(text)


def test_unhealthy_canary_is_rolled_back_and_no_other_host_switches(project: Project) -> None:
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    bad = commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    canary = project.hosts[0]
    # Unhealthy exactly while the canary runs the new revision, as a broken release is.
    health = HealthServer(status=lambda: 503 if project.revision(canary) == bad else 200)
    try:
        with_health(project, health.url)
        proc = project.deployer("rollout")
    finally:
        health.close()
    assert proc.returncode == 1, proc.stdout
    assert "FAILED at switch" in proc.stdout
    assert "503" in failure_of(proc.stdout, project.hosts[0].name)
    assert not any(f"  {h.name}: " in proc.stdout for h in project.hosts[1:])
    assert {h.name: project.current(h) for h in project.hosts} == before
    assert f"{project.hosts[0].name:<12} rolled back to {before[project.hosts[0].name]}" in (
        proc.stdout
    )


class NotHTTPServer:
    """A TCP server on loopback that answers every connection `hello` and closes."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/health"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.recv(4096)
                conn.sendall(b"hello\n")

    def close(self) -> None:
        self.sock.close()


def test_health_endpoint_that_is_not_http_fails_saying_what_it_answered(
    project: Project,
) -> None:
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    server = NotHTTPServer()
    try:
        with_health(project, server.url)
        proc = project.deployer("rollout")
        status = project.deployer("status")
    finally:
        server.close()
    assert proc.returncode == 1, proc.stdout
    assert "FAILED at switch" in proc.stdout
    assert "not an HTTP answer: 'hello'" in failure_of(proc.stdout, project.hosts[0].name)
    assert {h.name: project.current(h) for h in project.hosts} == before
    # `deployer status` probes the same URL: the app's fault, said as such
    assert "not an HTTP answer: 'hello'" in status.stdout + status.stderr, status
    for out in (proc, status):
        assert "internal error" not in out.stdout + out.stderr, out
        assert "Traceback" not in out.stdout + out.stderr, out


def test_host_lost_between_prepare_and_switch(sshd_fleet, project: Project) -> None:
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    lost = project.hosts[2]

    def cut_host3(hit: int) -> None:
        if hit == 1:  # the canary's health probe: prepare is over, host3 not yet switched
            sshd_fleet.stop(lost)

    health = HealthServer(on_request=cut_host3)
    try:
        with_health(project, health.url)
        text = project.inventory.read_text().replace("[ssh]\n", "[ssh]\nretry_deadline = 2\n")
        project.inventory.write_text(text)
        proc = project.deployer("rollout")
        sshd_fleet.restart(lost)
        check_lost_host_outcome(project, proc, before, lost)
    finally:
        health.close()


def check_lost_host_outcome(project: Project, proc, before: dict, lost: SSHTestHost) -> None:
    assert proc.returncode == 1, proc.stdout
    assert "connection refused at" in failure_of(proc.stdout, lost.name)  # its sshd is gone
    assert "rolling back" in proc.stdout
    assert {h.name: project.current(h) for h in project.hosts} == before
    # Released wherever reachable; the lost host keeps a lock whose holder is gone,
    # which the next rollout takes over (no `deployer unlock` needed).
    assert not (project.state / "demo.lock").exists()
    assert [h.name for h in project.hosts if (h.root / "run" / "deploy.lock").exists()] == [
        lost.name
    ]
    again = project.deployer("rollout")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"took over the stale lock: host {lost.name}: held by" in again.stdout
    history = json.loads(project.deployer("history", "--json", check=True).stdout)
    assert [e["result"] for e in history[:2]] == ["ok", "failed"]  # the lost one ended


MIGRATIONS = {
    "migrations/20240101000000_create.sql": "-- phase: expand\n-- up\n"
    "CREATE TABLE people (id INTEGER PRIMARY KEY, fname TEXT);\n-- down\nDROP TABLE people;\n",
}


def with_migrations(project: Project) -> None:
    text = project.inventory.read_text().replace(
        "[ssh]", '[migrations]\ndatabase = "sqlite:///app.sqlite3"\n\n[ssh]', 1
    )
    project.inventory.write_text(text)


def test_migration_that_is_not_utf8_is_named_by_rollout_and_migrate(project: Project) -> None:
    """A guard: these paths named the file already; pre-receive did not (test_push.py)."""
    with_migrations(project)
    commit(project.repo, MIGRATIONS, "schema")
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    name = "20240102000000_latin1.sql"
    (project.repo / "migrations" / name).write_bytes(
        b"-- phase: expand\n-- up\nINSERT INTO people (fname) VALUES ('Jos\xe9');\n"
    )
    commit(project.repo, {}, "latin-1")
    proc = project.deployer("rollout")
    assert proc.returncode == 1, proc.stdout
    assert "FAILED at expand" in proc.stdout
    assert f"migrations/{name}: not UTF-8 text" in proc.stdout
    assert {h.name: project.current(h) for h in project.hosts} == before
    db = f"sqlite:///{project.repo.parent / 'local.sqlite3'}"  # the checkout, on this machine
    for args in (["lint", "--dialect", "sqlite"], ["status", "--database", db]):
        local = project.deployer("migrate", *args)
        assert local.returncode == 2, local
        assert f"migrations/{name}: not UTF-8 text" in local.stderr
        assert "Traceback" not in local.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


WITNESS = """\
# Records, when it runs, which release every host's `current` points to.
import os
from pathlib import Path

phase = "{phase}"


def up(db):
    roots = Path(os.path.abspath(__file__)).parents[4]  # <roots>/<host>/releases/<r>/migrations
    db.execute("CREATE TABLE IF NOT EXISTS witness (phase TEXT, host TEXT, release TEXT)")
    for root in sorted(roots.iterdir()):
        if (root / "current").is_symlink():
            release = os.path.basename(os.readlink(root / "current"))
            db.execute("INSERT INTO witness VALUES (?, ?, ?)", (phase, root.name, release))


def down(db):
    db.execute("DELETE FROM witness WHERE phase = ?", (phase,))
"""


def test_expand_before_switch_contract_after(project: Project) -> None:
    with_migrations(project)
    commit(project.repo, MIGRATIONS, "schema")
    project.deployer("rollout", check=True)
    old = project.current(project.hosts[0])
    commit(
        project.repo,
        {
            "migrations/20240102000000_add_name.sql": "-- phase: expand\n-- up\n"
            "ALTER TABLE people ADD COLUMN name TEXT;\n"
            "-- down\nALTER TABLE people DROP COLUMN name;\n",
            "migrations/20240102000001_expand_witness.py": WITNESS.format(phase="expand"),
            "migrations/20240103000000_drop_fname.sql": "-- phase: contract\n-- up\n"
            "ALTER TABLE people DROP COLUMN fname;\n"
            "-- down\nALTER TABLE people ADD COLUMN fname TEXT;\n",
            "migrations/20240103000001_contract_witness.py": WITNESS.format(phase="contract"),
        },
        "split",
    )
    project.deployer("rollout", check=True)
    new = project.current(project.hosts[0])
    assert new != old
    db = project.hosts[0].root / "shared" / "app.sqlite3"
    seen = sqlite3.connect(db).execute("SELECT phase, host, release FROM witness").fetchall()
    names = [h.name for h in project.hosts]
    # expand ran while every host still ran the old release; contract once all ran the new
    assert seen == [("expand", n, old) for n in names] + [("contract", n, new) for n in names]
    columns = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(people)")]
    assert columns == ["id", "name"]
    # `deployer migrate` from the controller runs on the migrations host (the
    # database lives in its shared/, unreachable from here)
    status = project.deployer("migrate", "status", "--json", check=True).stdout
    rows = [json.loads(line) for line in status.splitlines() if line.startswith("{")]
    applied = {r["name"] for r in rows if r["event"] == "migration" and r["state"] == "applied"}
    assert applied == {"20240101000000_create", "20240102000000_add_name",
                       "20240102000001_expand_witness", "20240103000000_drop_fname",
                       "20240103000001_contract_witness"}  # fmt: skip
    summary = rows[-1]
    assert summary["event"] == "summary" and summary["dialect"] == "sqlite"
    assert str(project.hosts[0].root) in summary["dir"]
    assert not list(project.repo.glob("*.sqlite3"))
    dry = project.deployer("migrate", "up", "--dry-run", check=True)
    assert dry.stdout.strip() == "up to date", dry
    bad = project.deployer("migrate", "down", "--to", "no_such_migration")
    assert bad.returncode == 2 and "no_such_migration" in bad.stderr, bad


def test_failing_expand_switches_no_host(project: Project) -> None:
    with_migrations(project)
    commit(project.repo, MIGRATIONS, "schema")
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    commit(
        project.repo,
        {
            "migrations/20240102000000_bad.sql": "-- phase: expand\n-- up\n"
            "ALTER TABLE nosuchtable ADD COLUMN x TEXT;\n-- down\nSELECT 1;\n"
        },
        "bad migration",
    )
    proc = project.deployer("rollout")
    assert proc.returncode == 1, proc.stdout
    assert "FAILED at expand" in proc.stdout and "no host was switched" in proc.stdout
    assert "nosuchtable" in proc.stdout
    assert {h.name: project.current(h) for h in project.hosts} == before


def test_two_concurrent_rollouts_one_exits_3(project: Project) -> None:
    import subprocess
    import sys

    slow = project.inventory.read_text().replace(
        'build = "cat app.txt > built.txt"', 'build = "sleep 3; cat app.txt > built.txt"'
    )
    project.inventory.write_text(slow)
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(project.state)}
    argv = [sys.executable, "-m", "deployer", "-i", str(project.inventory), "rollout"]
    first = subprocess.Popen(argv, cwd=project.repo, env=env, stdout=subprocess.PIPE, text=True)
    try:
        _wait_for_file(project.state / "demo.lock")
        second = project.deployer("rollout")
    finally:
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    assert second.returncode == 3 and "held by" in second.stderr


def _wait_for_file(path: Path, timeout: float = 30) -> None:
    import time

    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_mid_rollout_releases_every_lock(project: Project) -> None:
    import signal
    import subprocess
    import sys

    slow = project.inventory.read_text().replace(
        'build = "cat app.txt > built.txt"',
        # the build says it started (in the host's root: releases/<new>/../..), then hangs
        'build = "touch ../../build-started && sleep 30"',
    )
    project.inventory.write_text(slow)
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(project.state)}
    argv = [sys.executable, "-m", "deployer", "-i", str(project.inventory), "rollout"]
    proc = subprocess.Popen(argv, cwd=project.repo, env=env, stdout=subprocess.PIPE, text=True)
    for h in project.hosts:  # inside prepare: every host's build is running
        _wait_for_file(h.root / "build-started")
    assert (project.state / "demo.lock").exists()
    assert all((h.root / "run" / "deploy.lock" / "owner.json").exists() for h in project.hosts)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not (project.state / "demo.lock").exists()
    assert not any((h.root / "run" / "deploy.lock").exists() for h in project.hosts)
    assert all(project.current(h) is None for h in project.hosts)


def test_max_failed_tolerates_one_host(project: Project) -> None:
    project.deployer("rollout", check=True)
    lost = project.hosts[1]
    # One host's build breaks (a file only that host has makes it fail).
    (lost.root / "shared").mkdir(exist_ok=True)
    text = project.inventory.read_text().replace(
        'build = "cat app.txt > built.txt"',
        'build = "test ! -e ../../shared/broken && cat app.txt > built.txt"',
    )
    text = text.replace("[ssh]", "[rollout]\nmax_failed = 1\n\n[ssh]", 1)
    project.inventory.write_text(text)
    (lost.root / "shared" / "broken").write_text("")
    sha = commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    proc = project.deployer("rollout")
    assert proc.returncode == 0, proc.stdout
    assert "exited with" in failure_of(proc.stdout, lost.name)  # its build
    for h in project.hosts:
        assert (project.revision(h) == sha) == (h is not lost)


def test_rollback_to_a_release_missing_somewhere_changes_nothing(project: Project) -> None:
    project.deployer("rollout", check=True)
    commit(project.repo, {"app.txt": "version 2\n"}, "v2")
    project.deployer("rollout", check=True)
    before = {h.name: project.current(h) for h in project.hosts}
    old = project.releases(project.hosts[0])[0]
    import shutil

    shutil.rmtree(project.hosts[2].root / "releases" / old)
    proc = project.deployer("rollback", "--to", old)
    assert proc.returncode == 2
    assert f"release {old} does not exist on: {project.hosts[2].name}" in proc.stderr
    assert {h.name: project.current(h) for h in project.hosts} == before


def test_agent_of_another_version_is_refused(project: Project) -> None:
    fake = project.hosts[0].root / ".deployer" / "deployer.pyz"
    import zipfile

    with zipfile.ZipFile(fake, "a") as zf:
        zf.writestr("deployer/agent/BUNDLE_ID", "0.0.1+old")
    proc = project.deployer("rollout")
    assert proc.returncode == 2  # a host not set up for this controller: bad configuration
    # the host checks the zipapp's sha256 before it runs it: the changed one never ran
    assert "is not this controller's" in proc.stdout and "run `deployer setup`" in proc.stdout
    assert project.releases(project.hosts[0]) == []
    project.deployer("setup", check=True)
    assert project.deployer("rollout").returncode == 0


ADD_NAME = {
    "migrations/20240102000000_add_name.sql": "-- phase: expand\n-- up\n"
    "ALTER TABLE people ADD COLUMN name TEXT;\n"
    "-- down\nALTER TABLE people DROP COLUMN name;\n",
}
DROP_FNAME = {
    "migrations/20240103000000_drop_fname.sql": "-- phase: contract\n-- up\n"
    "ALTER TABLE people DROP COLUMN fname;\n"
    "-- down\nALTER TABLE people ADD COLUMN fname TEXT;\n",
}


def people_columns(project: Project) -> list[str]:
    import sqlite3

    db = project.hosts[0].root / "shared" / "app.sqlite3"
    return [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(people)")]


def test_rollback_past_contract_migrations_is_refused(project: Project) -> None:
    with_migrations(project)
    commit(project.repo, MIGRATIONS, "schema")
    project.deployer("rollout", check=True)
    old = project.current(project.hosts[0])
    commit(project.repo, {**ADD_NAME, **DROP_FNAME}, "split")
    project.deployer("rollout", check=True)
    new = project.current(project.hosts[0])
    proc = project.deployer("rollback")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "20240103000000_drop_fname" in proc.stderr and f"oldest safe release is {new}" in (
        proc.stderr
    )
    assert all(project.current(h) == new for h in project.hosts)
    forced = project.deployer("rollback", "--force", check=True)
    assert "20240103000000_drop_fname" in forced.stdout
    assert all(project.current(h) == old for h in project.hosts)


def test_rollback_with_migrations_runs_expand_down_sections(project: Project) -> None:
    with_migrations(project)
    commit(project.repo, MIGRATIONS, "schema")
    project.deployer("rollout", check=True)
    commit(project.repo, ADD_NAME, "add name")
    project.deployer("rollout", check=True)
    assert people_columns(project) == ["id", "fname", "name"]
    plain = project.deployer("rollback", "--dry-run", check=True)
    assert "20240102000000_add_name (expand" in plain.stdout and "stay applied" in plain.stdout
    project.deployer("rollback", "--migrations", check=True)
    assert people_columns(project) == ["id", "fname"]
