"""`deployer master upgrade`: the master re-execs itself in place (same pid,
same listening socket, same workers) with real processes, sockets and load."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from master_helpers import REPO, Load, Masters, pid_alive, wait_for


def new_code(tmp_path: Path) -> Path:
    """A copy of the deployer package somewhere else: "the new version"."""
    code = tmp_path / "code"
    shutil.copytree(REPO / "deployer", code / "deployer", ignore=shutil.ignore_patterns("*.pyc"))
    return code


# The version before the host contract (as in test_upgrade_from_previous.py),
# whose upgrade state was copied field by field: masters of it run on hosts.
PREVIOUS = "4f27a0b2cd423a2f71f497df09d26f36f73748d9"


def previous_code(tmp_path: Path) -> Path:
    """The deployer package of PREVIOUS, from this checkout's history."""
    code = tmp_path / "previous"
    code.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", PREVIOUS, "deployer"], capture_output=True
    )
    assert archive.returncode == 0, (
        f"commit {PREVIOUS} is not in this clone's history (a shallow clone?): "
        + archive.stderr.decode()
    )
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)
    return code


@pytest.mark.timeout(90)
def test_upgrade_under_load_keeps_pid_and_workers_with_zero_failures(
    masters: Masters, tmp_path: Path
) -> None:
    m = masters.start(workers=2)
    pids = sorted(m.worker_pids())
    code = new_code(tmp_path)
    with Load(m.port, threads=8, duration=60) as load:
        load.wait_requests(200)
        # Same code again; new code elsewhere; then the default, which is now that code.
        for option, runs_on in (([], REPO), (["--code", str(code)], code), ([], code)):
            r = m.cli("upgrade", *option)
            assert r.returncode == 0, r.stdout + r.stderr + m.log_text()
            assert f"master pid {m.pid} upgraded in place on {runs_on} " in r.stdout
            seen = load.result.ok
            load.wait_requests(seen + 200)  # still served, by the same workers
            assert m.proc.poll() is None
            assert sorted(m.worker_pids()) == pids
        result = load.stop()
    assert result.failed == 0, result.summary()
    assert result.ok > 600, result.summary()
    status = m.status()
    assert status["pid"] == m.pid and status["upgrades"] == 3
    assert status["ready"] == 2 and status["state"] == "running"
    assert all(pid_alive(p) for p in pids)
    # The adopted state works: a reload replaces the workers, a stop drains and exits 0.
    r = m.cli("reload", "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(sorted(m.worker_pids())).isdisjoint(pids)
    assert m.get("/")[0] == 200
    r = m.cli("stop", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert m.wait_exit(15) == 0
    assert "upgraded in place" in m.log_text()


@pytest.mark.timeout(90)
def test_upgrade_to_the_previous_code_and_back(masters: Masters, tmp_path: Path) -> None:
    """The upgrade state is a contract between versions: the previous code adopts
    this code's state, and this code adopts the previous code's."""
    previous = previous_code(tmp_path)
    m = masters.start(workers=2)
    pids = sorted(m.worker_pids())
    with Load(m.port, threads=4, duration=60) as load:
        load.wait_requests(100)
        for code in (previous, REPO):
            r = m.cli("upgrade", "--code", str(code))
            assert r.returncode == 0, r.stdout + r.stderr + m.log_text()
            assert f"master pid {m.pid} upgraded in place on {code} " in r.stdout
            seen = load.result.ok
            load.wait_requests(seen + 100)
            assert sorted(m.worker_pids()) == pids
        result = load.stop()
    assert result.failed == 0, result.summary()
    status = m.status()
    assert status["pid"] == m.pid and status["upgrades"] == 2 and status["ready"] == 2
    r = m.cli("reload", "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(sorted(m.worker_pids())).isdisjoint(pids)


# Appended to arbiter.py of a copy of the code: a master cannot be adopted by
# it, though its preflight (the same adoption as a dry run) passes.
CANNOT_ADOPT = """

def _cannot_adopt(cls, state, dry_run=False):
    if not dry_run:
        raise RuntimeError("this copy cannot adopt a master (injected by the test)")
    return _from_state(cls, state, dry_run=dry_run)


_from_state = Arbiter.from_state.__func__
Arbiter.from_state = classmethod(_cannot_adopt)
"""


def code_that_cannot_adopt(tmp_path: Path) -> Path:
    code = new_code(tmp_path)
    arbiter = code / "deployer" / "master" / "arbiter.py"
    arbiter.write_text(arbiter.read_text() + CANNOT_ADOPT)
    return code


@pytest.mark.timeout(60)
def test_upgrade_that_cannot_adopt_execs_back_to_the_old_code(
    masters: Masters, tmp_path: Path
) -> None:
    m = masters.start(workers=2)
    pids = sorted(m.worker_pids())
    code = code_that_cannot_adopt(tmp_path)
    with Load(m.port, threads=4, duration=40) as load:
        load.wait_requests(100)
        answers = m.request({"cmd": "upgrade", "code": str(code)}, timeout=30)
        seen = load.result.ok
        load.wait_requests(seen + 100)
        result = load.stop()
    assert [a.get("event") for a in answers[:-1]] == ["checking", "exec"], answers
    last = answers[-1]
    assert last["ok"] is False and last["pid"] == m.pid, answers
    assert f"the new code in {code} could not adopt the master" in last["error"]
    assert "RuntimeError: this copy cannot adopt a master" in last["error"]
    assert f"back on the previous code {REPO}," in last["error"]
    assert result.failed == 0, result.summary()
    status = m.status()
    assert status["pid"] == m.pid and status["upgrades"] == 0
    assert sorted(m.worker_pids()) == pids and status["ready"] == 2
    r = m.cli("reload", "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(60)
def test_upgrade_to_code_that_does_not_start_changes_nothing(
    masters: Masters, tmp_path: Path
) -> None:
    m = masters.start(workers=1)
    pids = sorted(m.worker_pids())
    broken = tmp_path / "broken"
    (broken / "deployer" / "master").mkdir(parents=True)
    (broken / "deployer" / "__init__.py").write_text('raise SystemExit("broken new code")\n')
    (broken / "deployer" / "master" / "__init__.py").write_text("")
    r = m.cli("upgrade", "--code", str(broken))
    assert r.returncode == 1
    assert "failed its check, nothing changed" in r.stderr and "broken new code" in r.stderr
    r = m.cli("upgrade", "--code", str(tmp_path / "missing"))
    assert r.returncode == 1 and "does not exist" in r.stderr
    wait_for(lambda: m.status()["state"] == "running", 5, "master running")
    assert m.status()["pid"] == m.pid and sorted(m.worker_pids()) == pids
    assert m.get("/")[0] == 200
