"""Failure messages that point at the cause (issue 24.7), on real sshd hosts: each
says what went wrong where, once, with the exit code DESIGN.md gives it."""

from __future__ import annotations

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
