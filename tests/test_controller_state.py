"""The controller's state (locks, history, rollout logs: who deployed what, when,
from where) is for its user alone: directories 0700, files 0600, looser ones left by
an older deployer tightened on the next write; a state directory that is a symlink
or another user's is refused (exit 2) before any host is touched."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from rollout_helpers import APP, make_project, master_extra, stop_masters
from sshd import SSHTestHost

from deployer import githooks, lock
from deployer.errors import BadInput
from deployer.history import STATE_ENV, History, state_dir

NOBODY = 65534  # the tests run as root: a directory of another user is a chown away


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def beside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default state dir, `.deployer/` beside the inventory."""
    monkeypatch.delenv(STATE_ENV, raising=False)
    return tmp_path / ".deployer"


def test_history_and_lock_are_private_and_older_modes_are_tightened(
    tmp_path: Path, beside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beside.mkdir()
    beside.chmod(0o755)  # as an older deployer left them
    old = beside / "history.jsonl"
    old.write_text(json.dumps({"id": "1", "action": "rollout"}) + "\n")
    old.chmod(0o644)
    History(beside).append({"id": "2", "action": "rollout"})
    assert (mode(beside), mode(old)) == (0o700, 0o600)
    assert [e["id"] for e in History(beside).entries()] == ["2", "1"]

    staging = state_dir(str(tmp_path / "inventory.toml"), "staging")
    taker = lock.ControllerLock(staging, "shop")
    taker.acquire(lock.Owner("shop", "r"))
    History(staging).append({"id": "3", "action": "rollout"})
    for d in (beside, beside / "destinations", staging):
        assert mode(d) == 0o700, d
    assert mode(taker.path) == mode(staging / "history.jsonl") == 0o600
    assert capsys.readouterr() == ("", "")  # tightened without a word


@pytest.mark.parametrize("destination", [None, "staging"])
def test_a_symlinked_or_foreign_state_dir_is_refused(
    tmp_path: Path, beside: Path, destination: str | None
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    beside.symlink_to(elsewhere)
    state = state_dir(str(tmp_path / "inventory.toml"), destination)
    with pytest.raises(BadInput, match=rf"{beside} is a symlink: .*real directory of your own"):
        History(state).append({"id": "1", "action": "rollout"})
    with pytest.raises(BadInput, match="is a symlink"):
        lock.ControllerLock(state, "shop").acquire(lock.Owner("shop", "r"))
    assert list(elsewhere.iterdir()) == []

    beside.unlink()
    beside.mkdir()
    os.chown(beside, NOBODY, NOBODY)
    with pytest.raises(BadInput, match=rf"{beside} is owned by uid {NOBODY}, not by you"):
        lock.ControllerLock(state, "shop").acquire(lock.Owner("shop", "r"))
    assert list(beside.iterdir()) == [] and mode(beside) == 0o755


def test_a_pushed_rollouts_log_and_its_directories_are_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv(STATE_ENV, str(state))
    repo = tmp_path / "deploy.git"
    (repo / "deployer" / "logs").mkdir(parents=True, mode=0o755)
    state.mkdir(mode=0o755)
    cfg = githooks.HookConfig(repo, tmp_path / "missing-inventory.toml", "main", "staging")
    run = githooks.start_rollout(cfg, "a" * 40)
    run.proc.wait(timeout=60)  # it fails at once: there is no inventory
    assert mode(run.log) == 0o600
    assert mode(repo / "deployer" / "logs") == 0o700
    for d in (state, state / "destinations", state / "destinations" / "staging"):
        assert mode(d) == 0o700, d
    index = state / "destinations" / "staging" / "logs"
    assert mode(index) == 0o700 and (index / run.log.name).resolve() == run.log


def test_a_rollout_with_a_symlinked_state_dir_touches_no_host_and_a_good_one_is_private(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    from master_helpers import free_port

    host = ssh_hosts[0]
    project = make_project(tmp_path, [host], {"app.py": APP}, extra=master_extra(free_port()))
    real = project.state
    try:
        project.deployer("setup", check=True)
        real.mkdir(exist_ok=True)
        project.state = tmp_path / "state-link"
        project.state.symlink_to(real)
        proc = project.deployer("rollout")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"{project.state} is a symlink" in proc.stderr and "Traceback" not in proc.stderr
        assert project.releases(host) == [] and not (real / "history.jsonl").exists()

        project.state = real
        real.chmod(0o755)
        project.deployer("rollout", check=True)
        assert mode(real) == 0o700 and mode(real / "history.jsonl") == 0o600
    finally:
        stop_masters([host])
