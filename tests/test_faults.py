"""Faults mid-rollout on real sshd hosts under load: a release that crash-loops
only after it became ready fails the rollout in the watch window, and the fleet
goes back to the release it ran."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import Load
from rollout_helpers import (
    APP,
    Project,
    commit,
    make_project,
    master_extra,
    serving,
    small_disk,
)
from sshd import SSHTestHost


@pytest.fixture
def project(tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int) -> Iterator[Project]:
    extra = master_extra(port).replace("watch = 1\n", "watch = 8\n")
    with serving(tmp_path, ssh_hosts, {"app.py": APP}, extra) as p:
        yield p


def test_a_release_crashing_after_ready_fails_in_the_watch_and_is_rolled_back(
    project: Project, port: int
) -> None:
    before = {h.name: project.current(h) for h in project.hosts}
    commit(project.repo, {"release.env": "CRASH_AFTER_READY=3\n"}, "v2 dies 3 s after ready")
    loads = [Load(port, threads=2, duration=120, address=h.address) for h in project.hosts]
    for load in loads:
        load.__enter__()
    try:
        for load in loads:
            load.wait_requests(20)
        started = time.monotonic()
        proc = project.deployer("rollout")
        took = time.monotonic() - started
        after = [load.result.ok for load in loads]
        for load in loads:
            load.wait_requests(after[loads.index(load)] + 20)  # every host serves on
    finally:
        results = [load.stop() for load in loads]
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "into the watch (exited with code 1)" in out, out
    assert "rolling back" in out and "rollback FAILED" not in out
    # the fleet runs the release it ran before, every worker ready
    assert {h.name: project.current(h) for h in project.hosts} == before
    for h in project.hosts:
        assert project.revision(h) is not None
    # status tells: the canary's workers crashed minutes ago (exit 1); the rest are ok
    proc = project.deployer("status", "--json")
    rows = {r["host"]: r for r in json.loads(proc.stdout)}
    assert proc.returncode == 1
    canary_row = rows[project.hosts[0].name]
    assert (
        not canary_row["ok"] and "worker crash(es) in the last 5 min" in canary_row["problems"][0]
    )
    assert (
        canary_row["master"]["ready"] == 2
        and canary_row["current"] == before[project.hosts[0].name]
    )
    assert all(rows[h.name]["ok"] for h in project.hosts[1:]), rows
    # only the canary ever ran the crashing release: nothing failed elsewhere
    canary, *rest = results
    assert all(r.failed == 0 for r in rest), [r.summary() for r in rest]
    print(
        f"crash-after-ready: rollout failed and rolled back in {took:.1f}s; "
        f"failed requests: canary {canary.failed} of {canary.sent} (its workers crashed), "
        f"others {sum(r.failed for r in rest)} of {sum(r.sent for r in rest)}"
    )


class Trickle:
    """An HTTP endpoint whose first `slow` clients get one byte a second (at most 60
    bytes), the others a plain 200 at once."""

    def __init__(self, slow: int = 1_000_000) -> None:
        self.slow = slow
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        self.stopped = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        import threading

        self.sock.settimeout(0.5)
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connected.set()
            self.slow -= 1
            target = self.trickle if self.slow >= 0 else self.answer
            threading.Thread(target=target, args=(conn,), daemon=True).start()

    def answer(self, conn: object) -> None:
        with conn:  # type: ignore[attr-defined]
            conn.recv(65536)  # type: ignore[attr-defined]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[attr-defined]

    def trickle(self, conn: object) -> None:
        with conn:  # type: ignore[attr-defined]
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 20:
                if self.stopped.wait(1.0):
                    return
                try:
                    conn.sendall(bytes([byte]))  # type: ignore[attr-defined]
                except OSError:
                    return

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def trickle(request: pytest.FixtureRequest) -> Iterator[Trickle]:
    t = Trickle(getattr(request, "param", 1_000_000))
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def plain(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> Project:
    """No master: a v1 on every host, then [health] at a trickling endpoint."""
    p = make_project(tmp_path, ssh_hosts, {"app.txt": "v1\n"})
    p.deployer("setup", check=True)
    p.deployer("rollout", check=True)
    commit(p.repo, {"app.txt": "v2\n"}, "v2")
    return p


def with_health(project: Project, url: str, timeout: float) -> None:
    text = project.inventory.read_text().replace(
        "[ssh]\n", f'[health]\nurl = "{url}"\ntimeout = {timeout}\npasses = 1\n\n[ssh]\n', 1
    )
    project.inventory.write_text(text)


def agent_processes(user: str) -> list[str]:
    import subprocess

    out = subprocess.run(["ps", "-u", user, "-o", "args="], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "agent" in line and "health" in line]


def test_the_health_timeout_is_a_deadline_kept_on_the_host(
    plain: Project, trickle: Trickle
) -> None:
    before = {h.name: plain.current(h) for h in plain.hosts}
    with_health(plain, f"http://127.0.0.1:{trickle.port}/health", timeout=3)
    started = time.monotonic()
    proc = plain.deployer("rollout")
    took = time.monotonic() - started
    assert proc.returncode == 1
    assert "the deadline passed during probe 1" in proc.stdout, proc.stdout
    assert {h.name: plain.current(h) for h in plain.hosts} == before
    assert agent_processes(plain.hosts[0].user) == []
    assert took < 30, took  # 3 s on the canary, its rollback, no 60 s of trickle
    print(f"trickling health endpoint, timeout = 3: rollout failed and rolled back in {took:.1f}s")


@pytest.mark.parametrize("trickle", [1], indirect=True)  # the old release is healthy
def test_sigterm_during_a_health_check_puts_the_touched_host_back(
    plain: Project, trickle: Trickle
) -> None:
    import os
    import signal
    import subprocess
    import sys

    before = {h.name: plain.current(h) for h in plain.hosts}
    with_health(plain, f"http://127.0.0.1:{trickle.port}/health", timeout=20)
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(plain.state)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployer", "-i", str(plain.inventory), "rollout"],
        cwd=plain.repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # the canary has switched and its health probe is hanging on the trickle
        assert trickle.connected.wait(60), "no health probe reached the endpoint"
        canary = plain.hosts[0]
        assert plain.current(canary) != before[canary.name]
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        print(
            "SIGTERM mid health check: exited, host put back, in "
            f"{time.monotonic() - signalled:.1f}s"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert f"switched hosts rolled back ({canary.name} runs {before[canary.name]})" in out, out
    assert {h.name: plain.current(h) for h in plain.hosts} == before


class Frozen:
    """A host whose sshd (listener and every connection's process) is SIGSTOPped:
    TCP still connects, nothing answers. Thawed (SIGCONT) when the test ends."""

    def __init__(self, fleet: object, host: SSHTestHost) -> None:
        import signal

        from sshd import _sshd_descendants

        listener = fleet._server(host).pid  # type: ignore[attr-defined]
        self.pids = [listener, *_sshd_descendants(listener)]
        self.signal = signal
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, self.signal.SIGCONT)


def test_status_names_the_timeout_given_when_a_host_does_not_answer(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], sshd_fleet: object
) -> None:
    """`status --timeout 3` on a host whose sshd is frozen says 3s, the time the user
    gave, not the 3 + 2 s it waits for an answer's way back (issue 24.6d)."""
    project = make_project(tmp_path, ssh_hosts[:1], {"app.txt": "v1\n"})
    frozen = Frozen(sshd_fleet, ssh_hosts[0])
    try:
        began = time.monotonic()
        proc = project.deployer("status", "--json", "--timeout", "3", timeout=60)
        took = time.monotonic() - began
    finally:
        frozen.thaw()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)[0]["problems"] == ["no answer within 3s (host unreachable?)"]
    assert took < 15, took


@pytest.mark.parametrize("trickle", [1], indirect=True)  # only the frozen probe trickles
def test_a_host_that_freezes_mid_rollout_fails_it_in_bounded_time(
    plain: Project, trickle: Trickle, sshd_fleet: object
) -> None:
    """The canary's sshd freezes while its health probe runs: the rollout fails
    within the probe's deadline plus seconds, the others are untouched, `status`
    answers within its timeout, and once the host is back the next rollout takes
    over the lock it left without `deployer unlock`."""
    import subprocess
    import sys

    canary = plain.hosts[0]
    before = {h.name: plain.current(h) for h in plain.hosts}
    with_health(plain, f"http://127.0.0.1:{trickle.port}/health", timeout=3)
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(plain.state)}
    argv = [sys.executable, "-m", "deployer", "-i", str(plain.inventory)]
    started = time.monotonic()
    proc = subprocess.Popen(
        [*argv, "rollout"], cwd=plain.repo, env=env, stdout=subprocess.PIPE, text=True
    )
    frozen = None
    try:
        assert trickle.connected.wait(60), "the canary's health probe never started"
        frozen = Frozen(sshd_fleet, canary)
        froze = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        rollout_took = time.monotonic() - froze
        t0 = time.monotonic()
        status = subprocess.run(
            [*argv, "status", "--json", "--timeout", "3"],
            cwd=plain.repo, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        status_took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        if frozen is not None:
            frozen.thaw()
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert f"{canary.name}: health failed: the host stopped answering" in out, out
    assert "deploy lock left behind on this host" in out
    # the canary runs what it was switched to, and the summary says so; no other host moved
    assert f"{canary.name} runs {plain.current(canary)}" in out
    assert {h.name: plain.current(h) for h in plain.hosts[1:]} == {
        n: r for n, r in before.items() if n != canary.name
    }
    rows = {r["host"]: r for r in json.loads(status.stdout)}
    assert status.returncode == 1
    assert rows[canary.name]["problems"] == ["no answer within 3s (host unreachable?)"]
    assert all(rows[h.name]["ok"] for h in plain.hosts[1:]), rows
    assert status_took < 15, status_took
    # back again: the next rollout takes over the lock the frozen host kept
    again = subprocess.run(
        [*argv, "rollout"], cwd=plain.repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stdout
    assert f"took over the stale lock: host {canary.name}" in again.stdout, again.stdout
    print(
        f"frozen canary: rollout failed in {rollout_took:.1f}s after the freeze "
        f"({time.monotonic() - started:.1f}s in all); status answered in {status_took:.1f}s"
    )


BACKFILL = {
    "migrations/20240101000000_create.sql": "-- phase: expand\n-- up\n"
    "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER);\n"
    "INSERT INTO t (id) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n"
    " WHERE i < 40) SELECT i FROM n;\n-- down\nDROP TABLE t;\n",
}
SLOW_FILL = {
    "migrations/20240102000000_fill.py": (
        "import time\n\nphase = 'expand'\n\n\ndef up(db):\n"
        "    for lo, hi in db.batches('t', key='id', size=1):\n"
        "        db.execute('UPDATE t SET v = 1 WHERE id BETWEEN ? AND ?', (lo, hi))\n"
        "        time.sleep(0.25)\n"
        "        yield hi\n\n\ndef down(db):\n    pass\n"
    )
}


def test_a_killed_backfill_is_reported_as_killed_and_in_progress(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    import sqlite3
    import subprocess
    import sys

    hosts = ssh_hosts[:1]
    p = make_project(tmp_path, hosts, {"app.txt": "v1\n", **BACKFILL})
    text = p.inventory.read_text().replace(
        "[ssh]\n", '[migrations]\ndatabase = "sqlite:///app.sqlite3"\n\n[ssh]\n', 1
    )
    p.inventory.write_text(text)
    p.deployer("setup", check=True)
    p.deployer("rollout", check=True)
    commit(p.repo, SLOW_FILL, "a slow backfill")
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(p.state)}
    argv = [sys.executable, "-m", "deployer", "-i", str(p.inventory)]
    proc = subprocess.Popen(
        [*argv, "rollout"], cwd=p.repo, env=env, stdout=subprocess.PIPE, text=True
    )
    db = hosts[0].root / "shared" / "app.sqlite3"

    def chunks_done() -> int:
        with sqlite3.connect(db) as conn:
            row = conn.execute(
                "SELECT progress FROM deployer_migrations WHERE name LIKE '%_fill'"
            ).fetchone()
        return json.loads(row[0])["chunks"] if row and row[0] else 0

    try:
        from master_helpers import wait_for

        wait_for(lambda: chunks_done() >= 5, 60, "5 chunks of the backfill")
        runner = subprocess.run(
            ["pgrep", "-u", hosts[0].user, "-f", "migrate up"], capture_output=True, text=True
        ).stdout.split()
        assert runner, "the migration runner is not running on the host"
        for pid in runner:
            os.kill(int(pid), 9)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "killed on the host by a signal" in out, out
    assert "connection lost" not in out
    status = p.deployer("migrate", "status").stdout
    line = next(x for x in status.splitlines() if "_fill" in x)
    assert line.startswith("partial") and "in progress:" in line, status
    assert "its file is not in this release" in line and "missing" not in status


def test_setup_applies_a_changed_master_section_to_the_running_master(
    project: Project, port: int
) -> None:
    host = project.hosts[0]
    pid = int((host.root / "run" / "master.pid").read_text())
    text = project.inventory.read_text()
    text = text.replace("workers = 2\n", "workers = 3\n").replace(
        "shutdown_timeout = 10\n", "shutdown_timeout = 7\n"
    )
    project.inventory.write_text(text)
    with Load(port, threads=3, duration=120, address=host.address) as load:
        load.wait_requests(20)
        out = project.deployer("setup", "--hosts", host.name, check=True).stdout
        load.wait_requests(load.result.ok + 20)
        result = load.stop()
    assert "workers: 2 -> 3" in out and "shutdown_timeout: 10.0 -> 7.0" in out, out
    assert "master upgraded in place: new shutdown_timeout" in out
    assert "master scaled to 3 workers" in out
    assert result.failed == 0, result.summary()
    status = subprocess_master_status(project, host)
    assert status["pid"] == pid and status["configured"] == 3
    assert status["config"]["shutdown_timeout"] == 7.0
    from master_helpers import wait_for

    wait_for(lambda: subprocess_master_status(project, host)["ready"] == 3, 30, "3 ready")
    # what a running master cannot take says so, and nothing breaks
    project.inventory.write_text(text.replace(f':{port}"', f':{port + 1}"', 1))
    out = project.deployer("setup", "--hosts", host.name, check=True).stdout
    assert f'listen: "{host.address}:{port}" -> "{host.address}:{port + 1}"' in out
    assert "master still runs with its old listen: that takes a restart" in out


def subprocess_master_status(project: Project, host: SSHTestHost) -> dict:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "deployer", "master", "status", "--json", "--socket",
         str(host.root / "run" / "master.sock")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(r.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs as the host's disk")
def test_a_full_disk_is_said_as_such_with_the_space_there_is(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    host = ssh_hosts[0]
    p = make_project(tmp_path, [host], {"big.bin": os.urandom(600_000).hex()})
    with small_disk(p, host) as disk:
        p.deployer("setup", check=True)
        proc = p.deployer("rollout")
        assert proc.returncode == 1
        assert f"no space left on device under {disk}/{host.name}: " in proc.stdout, proc.stdout
        assert "MB free of 1.0 MB" in proc.stdout
        assert not [x for x in (disk / host.name / "releases").iterdir()]  # nothing left
