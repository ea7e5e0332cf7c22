"""A fleet set up by the previous version of deployer (the real code, from this
repository's history) keeps working once the current version runs `setup`: the
running master is upgraded in place under load, with no failed request, and the
next rollout goes through the new contract."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from master_helpers import Load
from rollout_helpers import APP, Project, commit, make_project, master_extra, stop_masters
from sshd import SSHTestHost

REPO = Path(__file__).resolve().parent.parent
# The last version before the host contract (deployer/hostapi) was introduced.
PREVIOUS = "4f27a0b2cd423a2f71f497df09d26f36f73748d9"


def previous_tree(dest: Path) -> Path:
    """The previous version's `deployer` package, extracted from git history."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS, "deployer"],
        capture_output=True,
    )
    assert archive.returncode == 0, (
        f"commit {PREVIOUS} is not in this clone's history (a shallow clone?): "
        + archive.stderr.decode()
    )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_previous(project: Project, code: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The previous version's `deployer` command (same venv, its own package first)."""
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(project.state), "PYTHONPATH": str(code)}
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "deployer", "-i", str(project.inventory), *args],
        capture_output=True,
        text=True,
        cwd=project.repo,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def project(tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int) -> Iterator[Project]:
    # the previous version knows no `[rollout] watch`: it comes after its steps
    extra = master_extra(port).replace("watch = 1\n", "")
    p = make_project(tmp_path, ssh_hosts[:1], {"app.py": APP}, extra=extra)
    try:
        yield p
    finally:
        stop_masters(ssh_hosts[:1])


def test_hosts_of_the_previous_version_are_upgraded_in_place(
    project: Project, port: int, tmp_path: Path
) -> None:
    code = previous_tree(tmp_path / "previous")
    run_previous(project, code, "setup")
    run_previous(project, code, "rollout")
    project.inventory.write_text(
        project.inventory.read_text().replace("[rollout]\n", "[rollout]\nwatch = 1\n", 1)
    )
    host = project.hosts[0]
    pid = int((host.root / "run" / "master.pid").read_text())
    old_pyz = (host.root / ".deployer" / "deployer.pyz").read_bytes()
    old_toml = (host.root / "master.toml").read_bytes()

    with Load(port, threads=3, duration=120, address=host.address) as load:
        load.wait_requests(20)
        out = project.deployer("setup", check=True).stdout
        load.wait_requests(load.result.ok + 20)
        result = load.stop()

    assert (host.root / ".deployer" / "deployer.pyz").read_bytes() != old_pyz
    assert "master upgraded in place" in out, out
    assert int((host.root / "run" / "master.pid").read_text()) == pid
    assert b"_resume" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert result.failed == 0, result.summary()
    # master.toml as the previous version wrote it, and the secrets file it now names,
    # which the running master took in the same setup
    new_toml = (host.root / "master.toml").read_text()
    added = f'env_file = "{host.root}/shared/.deployer-secrets.json"\n'
    # reload_batch's default is now every worker at once, written no more (an older
    # master reads no "100%"): the running master takes it in the same upgrade
    gone = "reload_batch = 1\n"
    assert new_toml.replace(added, "") == old_toml.decode().replace(gone, "")
    assert "master upgraded in place: new env_file" in out

    v2 = commit(project.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    with Load(port, threads=3, duration=120, address=host.address) as load:
        load.wait_requests(20)
        project.deployer("rollout", check=True)
        result = load.stop()
    assert project.revision(host) == v2
    assert result.failed == 0, result.summary()
    assert int((host.root / "run" / "master.pid").read_text()) == pid
