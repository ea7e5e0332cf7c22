"""Stages (`-d NAME`: inventory.NAME.toml over inventory.toml, their own lock, history
and logs) and the controller's deploy hooks (.deployer/hooks/ beside the inventory),
from the command line, the git push path and against real sshd hosts."""

from __future__ import annotations

import base64
import dataclasses
import getpass
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import free_port
from rollout_helpers import APP, Project, commit, git, make_project, master_extra, stop_masters
from sshd import SSHTestHost

from deployer import deploy_hooks, inventory
from deployer.errors import BadInput, InventoryError
from deployer.history import state_dir
from deployer.lock import ControllerLock, Owner

BASE = """
[app]
name = "shop"
deploy_to = "/srv/{host}"
shared = ["config/app.env", "uploads/"]

[master]
command = "node server.js"
listen = "{address}:3000"
workers = 4

[rollout]
batch = [1, "50%"]
canary = 1

[hosts.web1]
address = "10.0.0.1"
"""

STAGING = """
[app]
deploy_to = "/srv/staging-{host}"
shared = ["config/app.env"]

[master]
workers = 1

[rollout]
batch = 2

[hosts.stg1]
address = "10.0.9.1"
port = 2222
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployer", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


# --- stages: the overlay, without a network ---------------------------------------------


def test_overlay_merges_tables_and_replaces_arrays_and_scalars(tmp_path: Path) -> None:
    base = write(tmp_path, "inventory.toml", BASE)
    write(tmp_path, "inventory.staging.toml", STAGING)
    prod = inventory.load(base)
    stg = inventory.load(base, "staging")
    assert prod.destination is None and stg.destination == "staging"
    assert stg.path == str(base)  # state and relative paths stay beside the base
    assert stg.app.name == "shop"  # kept from the base
    assert stg.app.shared == ("config/app.env",)  # an array replaces
    assert stg.rollout.batch == (2,) and stg.rollout.canary == 1  # a scalar replaces one
    assert stg.master is not None and stg.master.workers == 1
    assert stg.master.listen == "{address}:3000" and stg.master.command == "node server.js"
    assert list(stg.hosts) == ["web1", "stg1"]  # [hosts] is a table: merged, host by host
    assert stg.hosts["stg1"].app.deploy_to == "/srv/staging-stg1"
    assert stg.hosts["stg1"].port == 2222
    assert prod.hosts["web1"].app.deploy_to == "/srv/web1"
    # the merge itself: tables recursively, anything else replaced whole
    merged = inventory.merge({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}, "d": {"x": 1}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": {"x": 1}}
    # -d from the command line, and `hosts` sees the merged document
    proc = cli("-i", str(base), "-d", "staging", "hosts", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["stg1"]["deploy_to"] == "/srv/staging-stg1" and rows["stg1"]["port"] == 2222


def test_overlay_problems_name_the_file_they_come_from(tmp_path: Path) -> None:
    base = write(tmp_path, "inventory.toml", BASE + '\n[health]\nurl = "ftp://x"\n')
    bad = STAGING.replace("port = 2222", "port = 0").replace("workers = 1", "wokers = 1")
    overlay = write(tmp_path, "inventory.staging.toml", bad)
    with pytest.raises(InventoryError) as e:
        inventory.load(base, "staging")
    assert e.value.path == f"{base} with inventory.staging.toml"
    problems = e.value.problems
    assert f"{overlay}: [hosts.stg1] port: expected an integer >= 1" in "\n".join(problems)
    assert any(p.startswith(f"{overlay}: [master] wokers: unknown key") for p in problems)
    # the base's own problem is the base's: no overlay named on it
    assert any(p.startswith("[health] url:") for p in problems), problems
    proc = cli("-i", str(base), "-d", "staging", "hosts", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{base} with inventory.staging.toml: 3 problems" in proc.stderr, proc.stderr
    # a TOML error in the overlay names the overlay
    overlay.write_text("[app\n")
    proc = cli("-i", str(base), "-d", "staging", "hosts", cwd=tmp_path)
    assert proc.returncode == 2 and f"{overlay}: 1 problem" in proc.stderr
    assert "not valid TOML" in proc.stderr


def test_a_missing_overlay_or_a_bad_destination_is_exit_2(tmp_path: Path) -> None:
    base = write(tmp_path, "shop.toml", BASE)
    proc = cli("-i", str(base), "-d", "prod", "hosts", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path / 'shop.prod.toml'}: 1 problem" in proc.stderr  # <stem>.NAME.toml
    assert "file not found: -d prod merges it over" in proc.stderr
    for name in ("../x", "a/b", "-x", ".hidden", "a.b"):
        proc = cli("-i", str(base), f"--destination={name}", "hosts", cwd=tmp_path)
        assert proc.returncode == 2 and "-d/--destination: expected a name" in proc.stderr, name
    with pytest.raises(BadInput):
        inventory.load(base, "../../etc/x")
    # no -d (or an empty one, as "$DEPLOYER_DESTINATION" of a hook can be): the base alone
    for extra in ([], ["-d", ""]):
        proc = cli("-i", str(base), *extra, "hosts", cwd=tmp_path)
        assert proc.returncode == 0 and "web1" in proc.stdout, proc.stderr


def test_state_dir_is_per_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inv = str(tmp_path / "inventory.toml")
    monkeypatch.delenv("DEPLOYER_STATE_DIR", raising=False)
    assert state_dir(inv) == tmp_path / ".deployer"
    assert state_dir(inv, "staging") == tmp_path / ".deployer" / "destinations" / "staging"
    monkeypatch.setenv("DEPLOYER_STATE_DIR", str(tmp_path / "st"))
    assert state_dir(inv) == tmp_path / "st"
    assert state_dir(inv, "staging") == tmp_path / "st" / "destinations" / "staging"
    # two destinations never share a lock
    a = ControllerLock(state_dir(inv), "shop")
    b = ControllerLock(state_dir(inv, "staging"), "shop")
    assert a.path != b.path
    a.acquire(Owner("shop", "x"))
    b.acquire(Owner("shop", "y"))  # not held: another file


# --- hooks and performer, without a network ---------------------------------------------


def hook(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_a_hook_is_shown_escaped_and_killed_at_its_time_limit(tmp_path: Path) -> None:
    said: list[str] = []
    path = hook(tmp_path, "post-deploy", "printf 'one\\033]0;owned\\007\\n'\necho two\nsleep 30\n")
    started = time.monotonic()
    run = deploy_hooks.run_hook("post-deploy", path, dict(os.environ), tmp_path, said.append, 1.0)
    assert time.monotonic() - started < 10
    assert run.code is None and not run.ok and "killed after 1s" in run.outcome()
    assert said == ["hook post-deploy: one\\x1b]0;owned\\x07", "hook post-deploy: two"]
    assert run.tail == ["one\\x1b]0;owned\\x07", "two"]
    # only the last lines are kept for messages
    path = hook(tmp_path, "on-failure", "for i in 1 2 3 4 5 6 7; do echo line$i; done\nexit 4\n")
    run = deploy_hooks.run_hook("on-failure", path, dict(os.environ), tmp_path, said.append, 5)
    assert run.code == 4 and run.outcome() == "exited 4"
    assert run.tail == ["line3", "line4", "line5", "line6", "line7"]
    # a file that cannot be executed: pre-deploy refuses (exit 2), others are skipped
    inv = tmp_path / "inventory.toml"
    hooks = deploy_hooks.DeployHooks(str(inv), said.append, "rollout", "shop", None, ["web1"])
    (tmp_path / ".deployer" / "hooks").mkdir(parents=True)
    (tmp_path / ".deployer" / "hooks" / "pre-deploy").write_text("exit 0\n")
    with pytest.raises(BadInput, match="pre-deploy is not an executable file"):
        hooks.pre_deploy()
    (tmp_path / ".deployer" / "hooks" / "post-deploy").write_text("exit 0\n")
    hooks.finished(True, False, 1.0)
    assert "warning: hook post-deploy not run" in said[-1]


def test_performer_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = f"{getpass.getuser()}@{socket.gethostname()}"
    assert deploy_hooks.performer({}) == default
    assert deploy_hooks.performer({"DEPLOYER_PERFORMER": " alice\x1b[2J "}) == "alice\\x1b[2J"
    over_ssh = {"SSH_CONNECTION": "10.1.2.3 50000 10.0.0.1 22", "USER": "deploy"}
    assert deploy_hooks.performer(over_ssh) == "deploy@10.1.2.3"
    # ExposeAuthInfo: the key that authenticated, by its comment in authorized_keys ...
    key = tmp_path / "id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f", str(key)],
        check=True,
    )
    kind, blob, _ = Path(f"{key}.pub").read_text().split()
    info = tmp_path / "auth-info"
    info.write_text(f"publickey {kind} {blob}\n")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text(
        f'no-pty,environment="X=a b" {kind} {blob} alice@laptop\n'
    )
    monkeypatch.setenv("HOME", str(home))
    env = {**over_ssh, "SSH_USER_AUTH": str(info)}
    assert deploy_hooks.performer(env) == "alice@laptop"
    # ... or its fingerprint, as ssh-keygen -l shows it
    (home / ".ssh" / "authorized_keys").write_text(f"{kind} {blob}\n")
    shown = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{key}.pub"], check=True, capture_output=True, text=True
    ).stdout.split()[1]
    assert deploy_hooks.performer(env) == shown == deploy_hooks.fingerprint(blob)
    assert shown.startswith("SHA256:") and base64.b64decode(blob)
    # the variable wins over everything
    assert deploy_hooks.performer({**env, "DEPLOYER_PERFORMER": "ci"}) == "ci"


# --- real sshd hosts --------------------------------------------------------------------


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


DUMP = 'env | grep "^DEPLOYER_" > "{out}/{name}.env"\n'


def dump_hook(project: Project, name: str, tail: str = "") -> Path:
    out = project.inventory.parent / "hook-env"
    out.mkdir(exist_ok=True)
    hook(
        project.inventory.parent / ".deployer" / "hooks",
        name,
        DUMP.format(out=out, name=name) + tail,
    )
    return out / f"{name}.env"


def on_root(host: SSHTestHost, root: Path) -> SSHTestHost:
    return dataclasses.replace(host, root=root)


@pytest.fixture
def one_host(ssh_hosts: list[SSHTestHost]) -> Iterator[list[SSHTestHost]]:
    hosts = ssh_hosts[:1]
    staging = [on_root(h, h.root.with_name(f"{h.name}-stg")) for h in hosts]
    try:
        yield hosts
    finally:
        stop_masters(hosts + staging)


def test_staging_and_production_have_their_own_lock_and_history(
    tmp_path: Path, one_host: list[SSHTestHost]
) -> None:
    host = one_host[0]
    port, staging_port = free_port(), free_port()
    p = make_project(tmp_path, one_host, {"app.py": APP}, extra=master_extra(port))
    stg_root = host.root.with_name(f"{host.name}-stg")
    (tmp_path / "inventory.staging.toml").write_text(
        f'[app]\ndeploy_to = "{host.root.parent}/{{host}}-stg"\n'
        f'[master]\nlisten = "{{address}}:{staging_port}"\n'
        f'[health]\nurl = "http://{{address}}:{staging_port}/health"\n'
    )
    p.deployer("setup", check=True)
    p.deployer("-d", "staging", "setup", check=True)
    prod_lock = ControllerLock(p.state, "demo")
    stg_lock = ControllerLock(p.state / "destinations" / "staging", "demo")
    # production is busy (this process holds its lock): staging deploys all the same
    held = Owner("demo", "f" * 40)
    prod_lock.acquire(held)
    try:
        busy = p.deployer("rollout")
        assert busy.returncode == 3 and f"deploy lock {prod_lock.path}: held by" in busy.stderr
        p.deployer("-d", "staging", "rollout", check=True)
    finally:
        prod_lock.release(held)
    assert p.current(on_root(host, stg_root)) is not None
    assert p.current(host) is None  # production untouched
    stg_lock.acquire(held)  # and the other way round
    try:
        busy = p.deployer("-d", "staging", "rollout")
        assert busy.returncode == 3 and f"deploy lock {stg_lock.path}: held by" in busy.stderr
        p.deployer("rollout", check=True)
    finally:
        stg_lock.release(held)
    assert p.revision(host) == p.revision(on_root(host, stg_root)) is not None
    prod = json.loads(p.deployer("history", "--json", check=True).stdout)
    stg = json.loads(p.deployer("-d", "staging", "history", "--json", check=True).stdout)
    assert [e["result"] for e in prod] == ["ok"] and [e["result"] for e in stg] == ["ok"]
    assert prod[0]["id"] != stg[0]["id"]
    assert prod[0]["releases"] == {host.name: p.current(host)}
    assert (p.state / "history.jsonl").exists()
    assert (p.state / "destinations" / "staging" / "history.jsonl").exists()


def test_deploy_hooks_around_rollouts_and_rollbacks(
    tmp_path: Path, one_host: list[SSHTestHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    host = one_host[0]
    p = make_project(tmp_path, one_host, {"app.py": APP}, extra=master_extra(free_port()))
    hooks = tmp_path / ".deployer" / "hooks"
    post_deploy = dump_hook(
        p, "post-deploy", "printf 'notified\\033[2J\\n'\necho 'slack down'\nexit 7\n"
    )
    monkeypatch.setenv("DEPLOYER_PERFORMER", "alice (ticket 42)")
    p.deployer("setup", check=True)

    # post-deploy: the variables; its failure is one line and changes nothing
    v1 = git(p.repo, "rev-parse", "HEAD")
    first = p.deployer("rollout")
    assert first.returncode == 0, first.stdout + first.stderr
    seen = env_file(post_deploy)
    release1 = p.current(host)
    assert release1 is not None
    duration = float(seen.pop("DEPLOYER_DURATION"))
    assert 0 < duration < 300
    log = Path(seen.pop("DEPLOYER_LOG"))  # a rollout from a terminal has its log too
    assert log.parent == p.state / "logs" and "deployer: verdict: ok" in log.read_text()
    assert {k: v for k, v in seen.items() if k in deploy_hooks.VARIABLES} == {
        "DEPLOYER_APP": "demo",
        "DEPLOYER_DESTINATION": "",
        "DEPLOYER_ACTION": "rollout",
        "DEPLOYER_REVISION": v1,
        "DEPLOYER_RELEASE": release1,
        "DEPLOYER_HOSTS": host.name,
        "DEPLOYER_ROLES": "",
        "DEPLOYER_PERFORMER": "alice (ticket 42)",
        "DEPLOYER_RESULT": "ok",
    }
    out = first.stdout
    assert "hook post-deploy: notified\\x1b[2J" in out and "\x1b" not in out  # escaped
    warning = [line for line in out.splitlines() if "warning: hook post-deploy" in line]
    assert len(warning) == 1 and "exited 7" in warning[0], out
    assert "result stands: ok" in warning[0] and "slack down" in warning[0]
    entry = json.loads(p.deployer("history", "--json", check=True).stdout)[0]
    assert entry["performer"] == "alice (ticket 42)" and entry["result"] == "ok"
    assert "alice (ticket 42)" in p.deployer("history", check=True).stdout

    # pre-deploy says no: nothing changes on the host, no history, no other hook
    post_deploy.unlink()
    hook(
        hooks, "pre-deploy", 'echo checking\necho "CI is red for $DEPLOYER_REVISION" >&2\nexit 3\n'
    )
    on_failure = dump_hook(p, "on-failure")
    v2 = commit(p.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    releases = p.releases(host)
    refused = p.deployer("rollout")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "pre-deploy hook" in refused.stderr and "exited 3" in refused.stderr
    assert f"CI is red for {v2}" in refused.stderr  # its last lines, in the message
    assert "hook pre-deploy: checking" in refused.stdout  # its output, as it came
    assert p.releases(host) == releases and p.current(host) == release1
    assert not (host.root / "run" / "deploy.lock").exists()
    assert len(json.loads(p.deployer("history", "--json", check=True).stdout)) == 1
    assert not post_deploy.exists() and not on_failure.exists()

    # the default performer: this user at this machine
    (hooks / "pre-deploy").unlink()
    monkeypatch.delenv("DEPLOYER_PERFORMER")
    hook(hooks, "post-deploy", DUMP.format(out=post_deploy.parent, name="post-deploy"))
    p.deployer("rollout", check=True)
    me = f"{getpass.getuser()}@{socket.gethostname()}"
    assert env_file(post_deploy)["DEPLOYER_PERFORMER"] == me
    assert json.loads(p.deployer("history", "--json", check=True).stdout)[0]["performer"] == me
    release2 = p.current(host)

    # a rollout that fails and rolls back: post-rollback, then on-failure
    post_rollback = dump_hook(p, "post-rollback", f'echo rollout >> "{tmp_path}/order"\n')
    hook(hooks, "on-failure", DUMP.format(out=on_failure.parent, name="on-failure")
         + f'echo failure >> "{tmp_path}/order"\n')  # fmt: skip
    post_deploy.unlink()
    v3 = commit(p.repo, {"release.env": "FAIL_HEALTH=1\n"}, "v3: broken health")
    failed = p.deployer("rollout")
    assert failed.returncode == 1, failed.stdout
    assert p.current(host) == release2
    for seen in (env_file(on_failure), env_file(post_rollback)):
        assert seen["DEPLOYER_ACTION"] == "rollout" and seen["DEPLOYER_RESULT"] == "failed"
        assert seen["DEPLOYER_REVISION"] == v3
    assert (tmp_path / "order").read_text().split() == ["rollout", "failure"]
    assert not post_deploy.exists()

    # `deployer rollback`: post-rollback, with the release it went back to
    on_failure.unlink()
    post_rollback.unlink()
    back = p.deployer("rollback")
    assert back.returncode == 0, back.stdout + back.stderr
    assert p.current(host) == release1
    seen = env_file(post_rollback)
    assert seen["DEPLOYER_ACTION"] == "rollback" and seen["DEPLOYER_RESULT"] == "ok"
    assert seen["DEPLOYER_RELEASE"] == release1 and seen["DEPLOYER_REVISION"] == v1
    assert seen["DEPLOYER_PERFORMER"] == me and seen["DEPLOYER_HOSTS"] == host.name
    assert not on_failure.exists()


def test_a_push_to_a_staging_repo_deploys_staging_and_runs_its_hooks(
    tmp_path: Path, one_host: list[SSHTestHost]
) -> None:
    host = one_host[0]
    p = make_project(tmp_path, one_host, {"app.py": APP}, extra=master_extra(free_port()))
    (tmp_path / "inventory.staging.toml").write_text(
        f'[app]\ndeploy_to = "{host.root.parent}/{{host}}-stg"\n'
    )
    stg = on_root(host, host.root.with_name(f"{host.name}-stg"))
    post_deploy = dump_hook(p, "post-deploy")
    bare = tmp_path / "deploy-staging.git"
    p.deployer("-d", "staging", "init", "--repo", str(bare), check=True)
    assert git(bare, "config", "--get", "deployer.destination") == "staging"
    p.deployer("-d", "staging", "setup", check=True)
    git(p.repo, "remote", "add", "deploy", str(bare))
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(p.state), "DEPLOYER_PERFORMER": "bob"}

    def push() -> subprocess.CompletedProcess:
        argv = ["git", "-C", str(p.repo), "push", "deploy", "main"]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)

    pushed = push()
    assert pushed.returncode == 0, pushed.stderr
    head = git(p.repo, "rev-parse", "HEAD")
    assert f"remote: deployer: {head[:12]} to staging ({host.name}): ok in" in pushed.stderr
    assert "remote: " in pushed.stderr and "hook post-deploy: running" in pushed.stderr
    assert p.revision(stg) == head and p.current(host) is None  # staging's root only
    seen = env_file(post_deploy)
    assert seen["DEPLOYER_DESTINATION"] == "staging" and seen["DEPLOYER_PERFORMER"] == "bob"
    assert Path(seen["DEPLOYER_LOG"]).parent == bare / "deployer" / "logs"
    entry = json.loads(p.deployer("-d", "staging", "history", "--json", check=True).stdout)[0]
    assert entry["performer"] == "bob" and entry["log"] == seen["DEPLOYER_LOG"]
    assert json.loads(p.deployer("history", "--json", check=True).stdout) == []
    log = p.deployer("-d", "staging", "logs", check=True).stdout
    assert "rollout ok in" in log
    # the pre-receive check looks at staging's lock
    commit(p.repo, {"app.py": APP + "\n# v2\n"}, "v2")
    lock = ControllerLock(p.state / "destinations" / "staging", "demo")
    held = Owner("demo", "e" * 40)
    lock.acquire(held)
    try:
        refused = push()
    finally:
        lock.release(held)
    assert refused.returncode != 0
    assert "rejected: another rollout is running" in refused.stderr, refused.stderr
    assert p.revision(stg) == head
