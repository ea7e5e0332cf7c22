"""Shared fixtures. Real SSH test hosts: see tests/sshd.py."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is on sys.path (rootdir conftest, no __init__.py): import as `sshd`
from master_helpers import Masters, Releases, free_port
from sshd import SSHD, SSHDFleet, SSHTestHost
from users import other_user


@pytest.fixture(scope="session")
def other() -> pwd.struct_passwd:
    """A second, unprivileged local user (the one who must not get in); needs root."""
    return other_user()


@pytest.fixture(scope="session", autouse=True)
def _systemd_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """System units that `deployer setup` installs for a `transport = "local"` host
    (as root) go under this root, never into the machine's /etc (the agent reads
    DEPLOYER_SYSTEMD_ROOT; SSH hosts, as the unprivileged test user, get user units)."""
    old = os.environ.get("DEPLOYER_SYSTEMD_ROOT")
    root = tmp_path_factory.mktemp("systemd-root")
    os.environ["DEPLOYER_SYSTEMD_ROOT"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("DEPLOYER_SYSTEMD_ROOT", None)
        else:
            os.environ["DEPLOYER_SYSTEMD_ROOT"] = old
        remove_gone_test_units()


def remove_gone_test_units() -> None:
    """The user units setup installed in the SSH login user's home for test deploy
    roots that are gone (sshd.py's temp dirs): that home outlives every session."""
    import pwd
    import tempfile

    from sshd import TEST_USER

    from deployer.master.units import MARK

    try:
        user = TEST_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        unit_dir = Path(pwd.getpwnam(user).pw_dir) / ".config" / "systemd" / "user"
        files = list(unit_dir.glob("deployer-*.service"))
    except (KeyError, OSError):
        return
    ours = os.path.join(tempfile.gettempdir(), "deployer-sshd-")
    for unit in files:
        try:
            text = unit.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        paths = [
            line.split("=", 1)[1]
            for line in text.splitlines()
            if line.startswith("ConditionPathExists=")
        ]
        gone = paths and all(p.startswith(ours) and not os.path.exists(p) for p in paths)
        if text.startswith(MARK) and gone:
            for path in (unit.parent / "default.target.wants" / unit.name, unit):
                with contextlib.suppress(OSError):
                    path.unlink()


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
def port() -> int:
    """A free TCP port on loopback, for the app a test deploys or a master binds."""
    return free_port()


@pytest.fixture
def masters(tmp_path: Path) -> Iterator[Masters]:
    """Masters started by a test, killed by pid at its end (workers die with them)."""
    fleet = Masters(tmp_path)
    try:
        yield fleet
    finally:
        fleet.cleanup()


@pytest.fixture
def releases(tmp_path: Path) -> Releases:
    """<tmp>/app/releases/r1 with the example app, and `current` pointing at it."""
    r = Releases(tmp_path / "app")
    r.make("r1")
    r.switch("r1")
    return r
