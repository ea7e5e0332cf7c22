"""Faults mid-rollout on real sshd hosts under load: a release that crash-loops
only after it became ready fails the rollout in the watch window, and the fleet
goes back to the release it ran."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import Load, free_port
from rollout_helpers import APP, Project, commit, make_project, master_extra, stop_masters
from sshd import SSHTestHost


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def project(tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int) -> Iterator[Project]:
    extra = master_extra(port).replace("watch = 1\n", "watch = 8\n")
    p = make_project(tmp_path, ssh_hosts, {"app.py": APP}, extra=extra)
    try:
        p.deployer("setup", check=True)
        p.deployer("rollout", check=True)
        yield p
    finally:
        stop_masters(ssh_hosts)


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
    status = project.deployer("status", "--json", check=True).stdout
    assert '"running": true' in status
    # only the canary ever ran the crashing release: nothing failed elsewhere
    canary, *rest = results
    assert all(r.failed == 0 for r in rest), [r.summary() for r in rest]
    print(
        f"crash-after-ready: rollout failed and rolled back in {took:.1f}s; "
        f"failed requests: canary {canary.failed} of {canary.sent} (its workers crashed), "
        f"others {sum(r.failed for r in rest)} of {sum(r.sent for r in rest)}"
    )
