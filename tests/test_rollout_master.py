"""Rollouts through the resident master on real sshd hosts, under load."""

from __future__ import annotations

import re
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import Load
from rollout_helpers import (
    APP,
    Project,
    commit,
    git,
    master_extra,
    serving,
)
from sshd import SSHTestHost

from deployer.bundle import ID_FILE


@pytest.fixture
def project(tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int) -> Iterator[Project]:
    with serving(tmp_path, ssh_hosts, {"app.py": APP}, master_extra(port)) as p:
        yield p


def loads(project: Project, port: int) -> list[Load]:
    return [Load(port, threads=3, duration=120, address=h.address) for h in project.hosts]


def test_rollout_under_load_fails_no_request(project: Project, port: int) -> None:
    v2 = commit(project.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    running = loads(project, port)
    for load in running:
        load.__enter__()
        load.wait_requests(20)
    try:
        proc = project.deployer("rollout", check=True)
        for load in running:  # every host goes on serving after the switch
            load.wait_requests(load.result.ok + 20)
    finally:
        results = [load.stop() for load in running]
    for h in project.hosts:
        assert project.revision(h) == v2
    for h, result in zip(project.hosts, results, strict=True):
        assert result.failed == 0, f"{h.name}: {result.summary()}\n{proc.stdout}"
        # the load really crossed the switch: it saw both releases answer
        assert len([r for r in result.bodies if r != "?"]) >= 2, result.summary()
        assert result.ok > 50
    # a reload that went well is one line per host, by release name (issue 24.6a)
    out, v2_name = proc.stdout, project.current(project.hosts[0])
    for h in project.hosts:
        said = rf"{h.name} +reload: 2 workers replaced in [\d.]+s \(release {v2_name}\)$"
        assert re.search(said, out, re.M), out
    assert "spawned:" not in out and "/releases/" not in out, out
    # -v: each worker's progress, by release name too
    back = project.deployer("rollback", "-v", check=True).stdout
    v1_name = project.current(project.hosts[0])
    assert re.search(rf"reload: spawned: worker 1 pid \d+ release {v1_name}$", back, re.M), back
    assert "reload: stopped: worker" in back and "/releases/" not in back, back


def test_release_failing_health_on_canary_is_rolled_back(project: Project, port: int) -> None:
    before = {h.name: project.current(h) for h in project.hosts}
    v1 = git(project.repo, "rev-parse", "HEAD")
    commit(project.repo, {"release.env": "FAIL_HEALTH=1\n"}, "broken health")
    with Load(port, threads=3, duration=120, address=project.hosts[0].address) as load:
        load.wait_requests(20)
        proc = project.deployer("rollout")
        result = load.stop()
    assert proc.returncode == 1, proc.stdout
    assert "FAILED at switch" in proc.stdout and "host1: " in proc.stdout
    assert {h.name: project.current(h) for h in project.hosts} == before
    assert all(project.revision(h) == v1 for h in project.hosts)
    assert result.failed == 0, result.summary()  # serving `/` never stopped


def test_release_crashing_at_boot_keeps_old_workers(project: Project, port: int) -> None:
    before = {h.name: project.current(h) for h in project.hosts}
    commit(project.repo, {"release.env": "CRASH_AT_BOOT=1\n"}, "crashes")
    with Load(port, threads=3, duration=120, address=project.hosts[0].address) as load:
        load.wait_requests(20)
        proc = project.deployer("rollout")
        result = load.stop()
    assert proc.returncode == 1, proc.stdout
    assert "master reload failed" in proc.stdout
    # a failed reload says what each worker did, before the failure (issue 24.6a)
    assert "host1 reload: spawned: worker 1 pid" in re.sub(r" +", " ", proc.stdout), proc.stdout
    progress = [line for line in proc.stdout.splitlines() if " reload: " in line]
    assert not [line for line in progress if "/releases/" in line], proc.stdout
    assert {h.name: project.current(h) for h in project.hosts} == before
    assert result.failed == 0, result.summary()


def test_a_master_the_agent_started_is_named_in_ps(project: Project) -> None:
    """`ps` shows `deployer master: DEPLOY_TO`, not the zipapp's bootstrap code the
    agent started it with (issue 24.6e); its kernel name (`ps -o comm`) too."""
    host = project.hosts[0]
    pid = int((host.root / "run" / "master.pid").read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert cmdline == f"deployer master: {host.root}\0".encode(), cmdline[:200]
    assert Path(f"/proc/{pid}/comm").read_text() == "deployer master\n"
    ps = subprocess.run(
        ["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True
    )
    assert ps.stdout.strip() == f"deployer master: {host.root}", ps.stdout
    # still a master to whoever checks a pidfile's pid (daemon.is_master)
    from deployer.master.daemon import is_master

    assert is_master(pid)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def _pretend_older_agent(host: SSHTestHost) -> None:
    """Rewrite the host's installed zipapp with another bundle id, as an older
    deployer would have left it (same code: the master keeps running from it)."""
    pyz = host.root / ".deployer" / "deployer.pyz"
    with zipfile.ZipFile(pyz) as old:
        entries = {i.filename: old.read(i) for i in old.infolist()}
    entries[ID_FILE] = b"0.0.1+older"
    with open(pyz, "wb") as fh, zipfile.ZipFile(fh, "w") as new:  # same inode and owner
        for name, data in entries.items():
            new.writestr(name, data)


def test_setup_upgrades_a_running_master_in_place_when_the_agent_changes(
    project: Project, port: int
) -> None:
    host = project.hosts[0]
    pid = int((host.root / "run" / "master.pid").read_text())
    workers = _children(pid)
    assert len(workers) >= 2  # the workers (and the master's helpers)
    _pretend_older_agent(host)
    with Load(port, threads=3, duration=120, address=host.address) as load:
        load.wait_requests(20)
        out = project.deployer("setup", check=True).stdout
        load.wait_requests(load.result.ok + 20)  # and it goes on serving after
        result = load.stop()
    assert f"{host.name}" in out and "master upgraded in place" in out, out
    # only the host whose agent changed was upgraded
    assert out.count("master upgraded in place") == 1, out
    assert int((host.root / "run" / "master.pid").read_text()) == pid
    assert _children(pid) == workers  # same workers, never restarted
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"_resume" in cmdline  # the same pid now runs the re-exec'd master
    assert result.failed == 0, result.summary()
    # and it still does its job: a rollout reloads it
    v2 = commit(project.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    project.deployer("rollout", check=True)
    assert project.revision(host) == v2
