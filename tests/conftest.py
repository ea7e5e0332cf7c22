"""Shared fixtures. Real SSH test hosts: see tests/sshd.py."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is on sys.path (rootdir conftest, no __init__.py): import as `sshd`
from master_helpers import Masters
from sshd import SSHD, SSHDFleet, SSHTestHost


@pytest.fixture(scope="session")
def sshd_fleet() -> Iterator[SSHDFleet]:
    """The session's sshd processes: `sshd_fleet.start(n)` adds n new hosts.

    Everything it started is stopped by pid at the end of the session. Not skipped
    when sshd is missing: CI installs openssh-server, and a silent skip would hide
    that the SSH tests never ran.
    """
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        pytest.fail(f"{SSHD} or ssh-keygen missing: apt-get install -y openssh-server")
    fleet = SSHDFleet()
    try:
        yield fleet
    finally:
        fleet.cleanup()


@pytest.fixture(scope="session")
def _shared_ssh_hosts(sshd_fleet: SSHDFleet) -> list[SSHTestHost]:
    return sshd_fleet.start(3)


@pytest.fixture
def ssh_hosts(
    sshd_fleet: SSHDFleet, _shared_ssh_hosts: list[SSHTestHost], request: pytest.FixtureRequest
) -> list[SSHTestHost]:
    """Three running sshd hosts with fresh, empty deploy roots and a fresh known_hosts.

    The sshd processes are shared across tests (starting them is cheap, but not
    free); a host that an earlier test stopped is started again first.
    """
    sshd_fleet.ensure_running(_shared_ssh_hosts)
    # short: unix socket paths under a host root must stay below 108 bytes
    label = re.sub(r"\W+", "-", request.node.name)[:20]
    return sshd_fleet.fresh_copies(_shared_ssh_hosts, label=label)


@pytest.fixture
def masters(tmp_path: Path) -> Iterator[Masters]:
    """Masters started by a test, killed by pid at its end (workers die with them)."""
    fleet = Masters(tmp_path)
    try:
        yield fleet
    finally:
        fleet.cleanup()
