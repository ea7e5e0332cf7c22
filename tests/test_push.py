"""`git push deploy main` end to end: a real bare repo made by `deployer init`,
its real hooks, real `git push`, three real sshd hosts running the master."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from rollout_helpers import APP, Project, commit, git, make_project, master_extra, stop_masters
from sshd import SSHTestHost

from deployer.loadgen import Load

MIGRATIONS = (
    '[migrations]\ndir = "migrations"\ndatabase = "sqlite:///app.sqlite3"\nhost = "host1"\n'
)
CREATE = "-- phase: expand\n-- up\nCREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT);\n"
UNSAFE = "-- phase: expand\n-- up\nALTER TABLE people DROP COLUMN name;\n"


@dataclass
class Pushed(Project):
    bare: Path = Path()

    def push(self, *args: str, wait: bool = True):
        """`git push deploy ...` from the app repo, in the environment a user has
        (plus the test's state dir, which the hooks inherit)."""
        argv = ["git", "-C", str(self.repo), "push", "deploy", *(args or ("main",))]
        env = {**os.environ, "DEPLOYER_STATE_DIR": str(self.state)}
        if not wait:
            return subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    def lock(self) -> Path:
        return self.state / "demo.lock"

    def history(self) -> list[dict]:
        return json.loads(self.deployer("history", "--json", check=True).stdout)

    def ref(self) -> str | None:
        proc = subprocess.run(
            ["git", "--git-dir", str(self.bare), "rev-parse", "--verify", "-q", "refs/heads/main"],
            capture_output=True,
            text=True,
        )
        return proc.stdout.strip() or None


@pytest.fixture
def project(tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int) -> Iterator[Pushed]:
    files = {"app.py": APP, "migrations/20261101000000_create_people.sql": CREATE}
    made = make_project(tmp_path, ssh_hosts, files, extra=master_extra(port) + MIGRATIONS)
    p = Pushed(
        **{f.name: getattr(made, f.name) for f in fields(made)}, bare=tmp_path / "deploy.git"
    )
    try:
        out = p.deployer("init", "--repo", str(p.bare), check=True).stdout
        assert f"git remote add deploy {p.bare}" in out
        git(p.repo, "remote", "add", "deploy", str(p.bare))
        p.deployer("setup", check=True)
        v1 = p.push()
        assert v1.returncode == 0, v1.stderr
        assert "remote: deployer: " in v1.stderr and ": ok in" in v1.stderr, v1.stderr
        yield p
    finally:
        stop_masters(ssh_hosts)


def wait_until(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_push_v2_under_load_fails_no_request(project: Pushed, port: int) -> None:
    v2 = commit(project.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    loads = [Load(port, threads=3, duration=120, address=h.address) for h in project.hosts]
    for load in loads:
        load.__enter__()
        load.wait_requests(20)
    try:
        proc = project.push()
    finally:
        results = [load.stop() for load in loads]
    assert proc.returncode == 0, proc.stderr
    assert all(project.revision(h) == v2 for h in project.hosts)
    for h, result in zip(project.hosts, results, strict=True):
        assert result.failed == 0, f"{h.name}: {result.summary()}\n{proc.stderr}"
    remote = [line for line in proc.stderr.splitlines() if line.startswith("remote: ")]
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr  # plain text for the pusher
    assert "remote: deployer: rollout " in remote[0]
    last = [line for line in remote if line.startswith("remote: deployer: ")][-1]
    assert f"{v2[:12]} to host1, host2, host3: ok in" in last, last
    assert project.history()[0]["revision"] == v2
    assert verdicts(proc.stderr) == ["ok (exit 0)"], proc.stderr
    follow = project.deployer("logs", "-f", rollout_id(proc.stderr))
    assert follow.returncode == 0 and "deployer: verdict: ok (exit 0)" in follow.stdout


def test_broken_push_is_rolled_back_and_the_pusher_sees_it(project: Pushed) -> None:
    v1 = project.revision(project.hosts[0])
    commit(project.repo, {"release.env": "FAIL_HEALTH=1\n"}, "v3: broken health")
    proc = project.push()
    # The pusher reads it in git's own output: the failed step, the host and why.
    remote = [line for line in proc.stderr.splitlines() if line.startswith("remote: ")]
    assert any("FAILED at switch" in line for line in remote), proc.stderr
    why = [line for line in remote if "  host1: " in line]
    assert why and "500" in why[-1], proc.stderr  # the release's health answer
    assert all(project.revision(h) == v1 for h in project.hosts)
    entry = project.history()[0]
    assert entry["result"] == "failed" and entry["failed_step"] == "switch"
    # git's exit code cannot say it (the ref moved before the rollout ran): the verdict
    # line does, and `deployer logs -f ID` exits with the rollout's code
    assert verdicts(proc.stderr) == ["FAILED (exit 1): at switch"], proc.stderr
    follow = project.deployer("logs", "-f", rollout_id(proc.stderr))
    assert follow.returncode == 1, follow.stdout + follow.stderr


def verdicts(stderr: str) -> list[str]:
    return [line.split("deployer: verdict: ", 1)[1].rstrip() for line in stderr.splitlines()
            if line.startswith("remote: ") and "deployer: verdict: " in line]  # fmt: skip


def rollout_id(stderr: str) -> str:
    line = next(x for x in stderr.splitlines() if x.startswith("remote: deployer: rollout "))
    return line.split()[3]


def test_a_pre_deploy_freeze_rejects_the_push_and_runs_once_per_push(project: Pushed) -> None:
    """pre-receive runs the controller's pre-deploy hook before the ref moves: a freeze
    rejects the push (git push exits non-zero); a push it allows deploys without
    running it a second time."""
    hooks = project.inventory.parent / ".deployer" / "hooks"
    hooks.mkdir(parents=True)
    counter = project.inventory.parent / "pre-deploy-runs"
    pre = hooks / "pre-deploy"
    pre.write_text(
        f'#!/bin/sh\necho "$DEPLOYER_REVISION" >> "{counter}"\n'
        'if [ -e "$(dirname "$0")/FREEZE" ]; then echo "deploy freeze until Monday"; exit 1; fi\n'
    )
    pre.chmod(0o755)
    (hooks / "FREEZE").write_text("")
    ref, current = project.ref(), project.current(project.hosts[0])
    v2 = commit(project.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    refused = project.push()
    assert refused.returncode != 0, refused.stderr
    assert "pre-receive hook declined" in refused.stderr
    assert "remote: deployer: push to main rejected: pre-deploy hook" in refused.stderr
    assert "deploy freeze until Monday" in refused.stderr, refused.stderr
    assert project.ref() == ref and project.current(project.hosts[0]) == current
    (hooks / "FREEZE").unlink()
    counter.unlink()
    allowed = project.push()
    assert allowed.returncode == 0 and verdicts(allowed.stderr) == ["ok (exit 0)"], allowed.stderr
    assert counter.read_text().split() == [v2]  # once, in pre-receive
    assert all(project.revision(h) == v2 for h in project.hosts)


def test_a_rollout_from_a_terminal_has_a_log_too(project: Pushed) -> None:
    v2 = commit(project.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    out = project.deployer("rollout", check=True).stdout
    assert out.rstrip().endswith("deployer: verdict: ok (exit 0)"), out
    deploy_id = out.split("rollout ", 1)[1].split(":", 1)[0]
    shown = project.deployer("logs", check=True).stdout  # the newest: this one
    assert f"rollout {v2} as " in shown and "deployer: verdict: ok (exit 0)" in shown
    log = project.state / "logs" / f"{deploy_id}.log"
    assert log.stat().st_mode & 0o777 == 0o600
    assert project.deployer("logs", "-f", deploy_id[:20]).returncode == 0
    entries = project.history()
    entry = entries[0]
    assert entry["id"] == deploy_id and entry["log"] == str(log), entries


def test_unsafe_expand_migration_is_rejected_before_anything_changes(project: Pushed) -> None:
    ref = project.ref()
    current = {h.name: project.current(h) for h in project.hosts}
    commit(project.repo, {"migrations/20261102000000_drop_name.sql": UNSAFE}, "unsafe")
    proc = project.push()
    assert proc.returncode != 0
    assert "pre-receive hook declined" in proc.stderr, proc.stderr
    assert "remote: deployer: push to main rejected: " in proc.stderr
    assert "20261102000000_drop_name" in proc.stderr and "drop" in proc.stderr
    assert project.ref() == ref
    assert {h.name: project.current(h) for h in project.hosts} == current
    assert len(project.history()) == 1  # the v1 rollout only


def test_second_push_during_a_rollout_is_rejected_naming_the_holder(project: Pushed) -> None:
    a = commit(project.repo, {"app.py": APP + "\n# a\n"}, "a")
    b = commit(project.repo, {"app.py": APP + "\n# b\n"}, "b")
    first = project.push(f"{a}:refs/heads/main", wait=False)
    try:
        wait_until(project.lock().exists, 60, "the first push's rollout to take the lock")
        second = project.push()
    finally:
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert second.returncode != 0
    assert "rejected: another rollout is running: deploy lock: held by " in second.stderr
    assert f"rollout of {a[:12]}" in second.stderr, second.stderr
    assert project.ref() == a != b
    assert all(project.revision(h) == a for h in project.hosts)


def test_rollout_survives_the_pusher_being_killed(project: Pushed) -> None:
    v2 = commit(project.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    pusher = project.push(wait=False)
    try:
        wait_until(project.lock().exists, 60, "the rollout to take the lock")
        deploy_id = json.loads(project.lock().read_text())["id"]
        canary = project.hosts[0]
        wait_until(lambda: project.revision(canary) == v2, 60, "the canary to switch")
        assert project.revision(project.hosts[2]) != v2  # mid-rollout: the last batch is to come
        pusher.send_signal(signal.SIGKILL)
    finally:
        pusher.wait(timeout=30)
    assert pusher.returncode == -signal.SIGKILL
    # `logs -f` follows the orphaned rollout to its end
    followed = project.deployer("logs", "-f", deploy_id, check=True, timeout=180).stdout
    assert "rollout ok in" in followed.splitlines()[-2], followed
    assert followed.splitlines()[-1].endswith("deployer: verdict: ok (exit 0)"), followed
    assert not project.lock().exists()
    assert all(project.revision(h) == v2 for h in project.hosts)
    entry = project.history()[0]
    assert entry["result"] == "ok" and entry["revision"] == v2
    log = project.deployer("logs", entry["id"], check=True).stdout
    assert "rollout ok in" in log
    assert Path(entry["log"]).parent == project.bare / "deployer" / "logs"


# --- without sshd hosts: init and the hooks' edges -------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Pushed:
    """A project whose inventory names a local host; nothing is deployed to it."""
    inv = tmp_path / "inventory.toml"
    inv.write_text(f'[app]\nname = "demo"\ndeploy_to = "{tmp_path}/host"\n[hosts.local]\n'
                   'transport = "local"\n')  # fmt: skip
    repo = tmp_path / "app"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(repo, {"README": "hi\n"}, "v1")
    p = Pushed(repo, inv, tmp_path / "state", [], bare=tmp_path / "deploy.git")
    git(repo, "remote", "add", "deploy", str(p.bare))
    return p


def test_init_twice_changes_nothing_and_keeps_a_foreign_hook(local: Pushed) -> None:
    local.bare.mkdir()
    git(local.bare, "init", "-q", "--bare")
    foreign = local.bare / "hooks" / "post-update"
    marker = local.bare.parent / "foreign-ran"
    foreign.write_text(f'#!/bin/sh\necho "$@" > {marker}\n')
    foreign.chmod(0o755)
    first = local.deployer("init", "--repo", str(local.bare), check=True).stdout
    assert "kept the existing post-update hook as post-update.chained" in first
    second = local.deployer("init", "--repo", str(local.bare), check=True).stdout
    assert "already set up, nothing changed" in second
    config = git(local.bare, "config", "--get-regexp", "^deployer")
    assert f"deployer.inventory {local.inventory}" in config and "deployer.branch main" in config
    # a branch that is not the deploy branch: accepted, not deployed, foreign hook chained
    proc = local.push("main:refs/heads/feature")
    assert proc.returncode == 0, proc.stderr
    assert "refs/heads/feature is not the deploy branch (main): not deployed" in proc.stderr
    assert marker.read_text().strip() == "refs/heads/feature"


def test_push_with_a_broken_inventory_is_rejected_naming_the_key(local: Pushed) -> None:
    local.deployer("init", "--repo", str(local.bare), check=True)
    local.inventory.write_text(local.inventory.read_text() + "[rollout]\nbatch = 0\n")
    proc = local.push()
    assert proc.returncode != 0
    assert "push to main rejected: the inventory does not validate" in proc.stderr
    assert "[rollout] batch" in proc.stderr, proc.stderr
    assert local.ref() is None


def _with_migrations(local: Pushed) -> None:
    local.inventory.write_text(
        local.inventory.read_text()
        + '[migrations]\ndir = "migrations"\ndatabase = "sqlite:///app.sqlite3"\n'
    )
    local.deployer("init", "--repo", str(local.bare), check=True)


def _rejected(local: Pushed) -> str:
    proc = local.push()
    assert proc.returncode != 0
    assert "pre-receive hook declined" in proc.stderr, proc.stderr
    assert "remote: deployer: push to main rejected: " in proc.stderr
    assert "Traceback" not in proc.stderr and "deployer-lint-" not in proc.stderr, proc.stderr
    assert local.ref() is None
    return proc.stderr


def test_push_of_a_migration_that_is_not_utf8_is_rejected_naming_it(local: Pushed) -> None:
    _with_migrations(local)
    path = "migrations/20261102000000_latin1.sql"
    target = local.repo / path
    target.parent.mkdir()
    target.write_bytes(b"-- phase: expand\n-- up\nINSERT INTO people VALUES (1, 'Jos\xe9');\n")
    git(local.repo, "add", "-A")
    git(local.repo, "commit", "-q", "-m", "latin-1")
    assert f"{path}: not UTF-8 text" in _rejected(local)


def test_push_lint_messages_name_the_files_path_in_the_repository(local: Pushed) -> None:
    _with_migrations(local)
    commit(local.repo, {"migrations/20261102000000_drop_name.sql": UNSAFE}, "unsafe")
    assert "migrations/20261102000000_drop_name.sql:3: drop-column" in _rejected(local)
    commit(local.repo, {"migrations/20261102000000_drop_name.sql": "-- up\nSELECT 1;\n"}, "x")
    assert "migrations/20261102000000_drop_name.sql: no phase" in _rejected(local)
    commit(local.repo, {"migrations/20261102000000_drop_name.sql": CREATE}, "fixed")
    commit(local.repo, {"migrations/2026_bad name.sql": CREATE}, "misnamed")
    assert "migrations/2026_bad name.sql: not a migration file name" in _rejected(local)


def test_init_refuses_a_work_tree_and_a_bad_branch(local: Pushed) -> None:
    proc = local.deployer("init", "--repo", str(local.repo))
    assert proc.returncode == 2 and "is not a bare git repository" in proc.stderr
    proc = local.deployer("init", "--repo", str(local.bare), "--branch", "a..b")
    assert proc.returncode == 2 and "--branch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hook_environment_is_sanitized_for_child_processes(local: Pushed) -> None:
    from deployer.githooks import clean_env

    local.deployer("init", "--repo", str(local.bare), check=True)
    dump = local.bare.parent / "hook-env"
    chained = local.bare / "hooks" / "pre-receive.chained"
    chained.write_text(f"#!/bin/sh\nenv -0 > {dump}\n")
    chained.chmod(0o755)
    assert local.push().returncode == 0
    seen = dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)
    assert {"GIT_DIR", "GIT_QUARANTINE_PATH", "GIT_OBJECT_DIRECTORY"} <= set(seen)
    cleaned = clean_env(seen)
    assert not [k for k in cleaned if k.startswith("GIT_")], cleaned
    assert cleaned["PATH"] == seen["PATH"]


def test_demo_deploys_two_hosts_under_load_with_no_failed_request(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "demo", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("web")]
    assert len(rows) == 2
    for _host, before, after, requests, failed in rows:
        assert before != after and int(requests) > 0 and failed == "0", proc.stdout
    assert "remote: deployer: " in proc.stdout and "demo ok" in proc.stdout
    print(f"deployer demo took {took:.1f}s")
    # nothing left running: each master removes its pidfile when it has stopped
    for host in ("web1", "web2"):
        assert not (tmp_path / "demo" / "hosts" / host / "run" / "master.pid").exists()


def test_log_path_by_id_prefix_or_newest(tmp_path: Path) -> None:
    from deployer.errors import BadInput
    from deployer.githooks import log_path

    with pytest.raises(BadInput, match="no rollout logs yet"):
        log_path(tmp_path, None)
    (tmp_path / "logs").mkdir()
    for name in ("20261130070000-aaaaaaa-0001", "20261130080000-bbbbbbb-0002"):
        (tmp_path / "logs" / f"{name}.log").write_text(name)
    assert log_path(tmp_path, None).stem == "20261130080000-bbbbbbb-0002"
    assert log_path(tmp_path, "20261130070000").stem == "20261130070000-aaaaaaa-0001"
    assert log_path(tmp_path, "20261130080000-bbbbbbb-0002").stem.endswith("0002")
    with pytest.raises(BadInput, match="matches 2 logs"):
        log_path(tmp_path, "2026")
    with pytest.raises(BadInput, match="no log matches 'zzz'"):
        log_path(tmp_path, "zzz")
