"""Failure messages that point at the cause (issue 24.7), on real sshd hosts: each
says what went wrong where, once, with the exit code DESIGN.md gives it."""

from __future__ import annotations

import time
from pathlib import Path

from master_helpers import free_port
from rollout_helpers import APP, make_project, master_extra
from sshd import SSHTestHost


def test_a_host_without_the_agent_says_so_once_and_exits_2(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    p = make_project(tmp_path, ssh_hosts[:1], {"app.py": APP}, extra=master_extra(free_port()))
    proc = p.deployer("rollout")  # no `deployer setup` before it
    pyz = ssh_hosts[0].root / ".deployer" / "deployer.pyz"
    said = f"host1: lock failed: the host agent is not installed at {pyz}: run `deployer setup`"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"deployer: {said}"
    assert f"verdict: FAILED (exit 2): {said}" in proc.stdout
    assert "lock failed: lock failed" not in proc.stdout + proc.stderr


def test_a_port_nothing_listens_on_is_said_to_refuse(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[0]
    p = make_project(tmp_path, [h], {"app.py": APP})
    closed = free_port()  # bound and let go: nothing listens there
    p.inventory.write_text(
        p.inventory.read_text().replace(f"port = {h.port}\n", f"port = {closed}\n")
    )
    refused = f"connection refused at {h.address}:{closed} (no sshd listening?"
    started = time.monotonic()
    proc = p.deployer("status")
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"host1: NOT OK\n  - {refused}"), proc.stdout
    assert "no answer within" not in proc.stdout
    assert took < 6.5, took  # retried briefly, well within status's 5 s + 2
    proc = p.deployer("rollout")
    assert proc.returncode == 1
    assert f"deployer: host1: {refused}" in proc.stderr, proc.stderr
