"""Roles: a web role and a worker role (queue consumers: no socket, no health) on
shared and separate real sshd hosts, each role its own master; rollouts and
rollbacks under load on the web role; `--roles`; per-role overrides and where
`deployer config` says each value comes from."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import Load
from rollout_helpers import (
    APP,
    WORKER,
    Project,
    commit,
    make_project,
    roles_extra,
    stop_masters,
    with_roles,
)
from sshd import SSHTestHost

from deployer import inventory
from deployer.errors import HostSelectionError, InventoryError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def shop(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> Iterator[Project]:
    from master_helpers import free_port

    port = free_port()
    files = {"app.py": APP, "worker.py": WORKER}
    p = make_project(tmp_path, ssh_hosts, files, extra=roles_extra(port))
    p.inventory.write_text(with_roles(p.inventory.read_text(), ssh_hosts))
    p.port = port  # type: ignore[attr-defined]
    try:
        yield p
    finally:
        stop_masters(ssh_hosts)


def roles_status(p: Project) -> dict[str, dict[str, dict]]:
    proc = p.deployer("status", "--json")
    rows = json.loads(proc.stdout)
    return {r["host"]: {role["role"]: role for role in r["roles"]} for r in rows}


def jobs_by_release(path: Path) -> tuple[dict[str, int], list[str]]:
    """Finished jobs per release, and the jobs that started but never ended."""
    started: dict[tuple[str, str], str] = {}
    done: dict[str, int] = {}
    for line in path.read_text().splitlines():
        kind, pid, release, n = line.split()
        if kind == "start":
            started[(pid, n)] = release
        else:
            started.pop((pid, n))
            done[release] = done.get(release, 0) + 1
    return done, [f"{pid} job {n} ({rel})" for (pid, n), rel in started.items()]


def running_workers(path: Path) -> set[str]:
    """Pids that logged a job start in the last second."""
    lines = path.read_text().splitlines()[-40:]
    return {line.split()[1] for line in lines}


def test_web_and_worker_roles_roll_out_and_back_under_load(
    shop: Project, ssh_hosts: list[SSHTestHost]
) -> None:
    p, port = shop, shop.port  # type: ignore[attr-defined]
    host1, host2, host3 = ssh_hosts
    p.deployer("setup", check=True)
    # a master per role: its own toml, socket, pid and log
    for h, roles in ((host1, ["web", "worker"]), (host2, ["web"]), (host3, ["worker"])):
        assert sorted(f.name for f in h.root.glob("master*.toml")) == [
            f"master-{r}.toml" for r in roles
        ]
    assert "listen =" not in (host3.root / "master-worker.toml").read_text()
    out = p.deployer("rollout", check=True).stdout
    v1 = p.current(host1)
    assert "web master not running: starting it" in out and "worker master not running" in out
    for h in ssh_hosts:
        assert p.current(h) == v1
    status = roles_status(p)
    assert set(status[host1.name]) == {"web", "worker"} and set(status[host3.name]) == {"worker"}
    for roles in status.values():
        for role in roles.values():
            assert role["master"]["ready"] == 2 and role["master"]["release"] == v1, role
            assert role["problems"] == []
    # the worker-only host has one master, whose control socket is its only socket
    assert [s.name for s in (host3.root / "run").glob("*.sock")] == ["master-worker.sock"]

    commit(p.repo, {"VERSION": "2\n"}, "v2")
    loads = [Load(port, threads=2, duration=120, address=h.address) for h in (host1, host2)]
    for load in loads:
        load.__enter__()
    try:
        for load in loads:
            load.wait_requests(20)
        out = p.deployer("rollout", check=True).stdout
        v2 = p.current(host1)
        assert v2 != v1
        # the web role keeps serving while the worker role on the same host reloads
        assert "reload worker:" in out and "reload web:" in out, out
        for load in loads:
            load.wait_requests(load.result.ok + 20)
        out = p.deployer("rollback", check=True).stdout
        assert "rolled back" in out or "rollback ok" in out, out
        for load in loads:
            load.wait_requests(load.result.ok + 20)
    finally:
        results = [load.stop() for load in loads]
    for r in results:
        assert r.failed == 0, r.summary()
        bodies = " ".join(r.bodies)
        assert v1 in bodies and v2 in bodies  # both releases served, with no failure
    for h in ssh_hosts:
        assert p.current(h) == v1
    status = roles_status(p)
    for roles in status.values():
        for role in roles.values():
            assert role["master"]["release"] == v1 and role["master"]["ready"] == 2, role
    # every job started was finished, by both releases, on the shared and the worker host
    for h in (host1, host3):
        log = h.root / "shared" / "jobs.log"
        done, cut = jobs_by_release(log)
        # only the jobs of the workers still running may be open
        assert all(c.split()[0] in running_workers(log) for c in cut), cut
        assert done.get(v1, 0) > 0 and done.get(v2, 0) > 0, done


def test_roles_selects_hosts_and_masters(shop: Project, ssh_hosts: list[SSHTestHost]) -> None:
    p = shop
    host1, host2, host3 = ssh_hosts
    p.deployer("setup", check=True)
    p.deployer("rollout", check=True)
    before = roles_status(p)
    hooks = p.inventory.parent / ".deployer" / "hooks"
    hooks.mkdir(parents=True)
    told = p.inventory.parent / "told"
    (hooks / "post-deploy").write_text(f'#!/bin/sh\necho "$DEPLOYER_ROLES" > {told}\n')
    (hooks / "post-deploy").chmod(0o755)
    commit(p.repo, {"VERSION": "2\n"}, "v2")
    out = p.deployer("rollout", "--roles", "worker", check=True).stdout
    assert told.read_text() == "worker\n"  # the hooks are told the roles acted on
    assert p.deployer("history", "--json", check=True).stdout.count('"worker"') >= 1
    assert host2.name not in re.findall(r"^(\S+?):", out, re.M), out  # web-only host untouched
    assert "reload web" not in out and "reload worker:" in out
    v2 = p.current(host3)
    assert p.current(host1) == v2 and p.current(host2) != v2
    after = roles_status(p)
    assert after[host1.name]["worker"]["master"]["release"] == v2
    assert after[host3.name]["worker"]["master"]["release"] == v2
    # the web master on the shared host was not reloaded: same workers, old release pinned
    assert (
        after[host1.name]["web"]["master"]["release"]
        == before[host1.name]["web"]["master"]["release"]
    )
    # a documented command leaves the fleet healthy: each role's workers run the
    # release that role was switched to, and status says each (issue 24.6f)
    web_release = before[host1.name]["web"]["master"]["release"]
    proc = p.deployer("status")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith(f"{host1.name}: ok: {v2}"))
    assert "web: master pid" in line and f"ready on {web_release}" in line, line
    assert f"ready on {v2}" in line.split("worker: ")[1], line
    shared = {r["role"]: r for r in json.loads(p.deployer("status", "--json").stdout)[0]["roles"]}
    assert shared["web"]["release"] == web_release and shared["worker"]["release"] == v2
    # status --roles web names only the web masters
    rows = json.loads(p.deployer("status", "--json", "--roles", "web").stdout)
    assert [r["host"] for r in rows] == [host1.name, host2.name]
    assert all([role["role"] for role in r["roles"]] == ["web"] for r in rows)
    # on the host, the operator's wrapper finds a role's master by --role
    wrapper = host1.root / "bin" / "deployer"

    def on_host1(line: str) -> subprocess.CompletedProcess[str]:
        argv = host1.ssh_argv(line)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    worker_pid = int((host1.root / "run" / "master-worker.pid").read_text())
    proc = on_host1(f"{wrapper} master status --role worker")
    assert proc.returncode == 0 and f"master pid {worker_pid} " in proc.stdout, proc.stderr
    proc = on_host1(f"{wrapper} master status --role 'x;y'")
    assert proc.returncode == 2 and "--role: expected a role name" in proc.stderr
    proc = on_host1(f"{wrapper} master status --role cron")
    assert proc.returncode == 2 and "no master for that role here" in proc.stderr
    # logs of one role: the worker masters' logs, prefixed host/role
    out = p.deployer("app", "logs", "-n", "5", "--roles", "worker", check=True).stdout
    assert f"{host3.name}/worker: " in out and f"{host1.name}/worker: " in out
    assert "/web: " not in out
    proc = p.deployer("rollout", "--roles", "db")
    assert proc.returncode == 2 and "--roles: 'db' matches no role" in proc.stderr
    # setup --roles web leaves the worker masters alone and says nothing of them
    out = p.deployer("setup", "--roles", "web", check=True).stdout
    assert "worker" not in out, out
    # host1 no longer runs workers: setup says what it left behind, and leaves it
    text = p.inventory.read_text().replace('roles = ["web", "worker"]', 'roles = ["web"]')
    p.inventory.write_text(text)
    out = p.deployer("setup", check=True).stdout
    assert "master-worker.toml is for role worker, which the inventory no longer gives" in out
    assert (host1.root / "master-worker.toml").exists()


def test_config_shows_where_each_value_comes_from(tmp_path: Path) -> None:
    text = (REPO / "examples" / "shop" / "inventory.toml").read_text()
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    inv = inventory.load(path)
    web1, jobs1 = inv.hosts["web1"], inv.hosts["jobs1"]
    assert web1.role_names == ["web", "worker"] and jobs1.role_names == ["worker"]
    big = inv.hosts["web2"].role("web")
    assert big.master is not None and big.master.workers == 8
    assert big.origins["master.workers"] == "[hosts.web2.roles.web.master]"
    worker = web1.role("worker")
    assert worker.master is not None and worker.master.listen is None and worker.health is None
    assert worker.origins["master.shutdown_timeout"] == "[roles.worker.master]"
    assert web1.role("web").origins["master.shutdown_timeout"] == "[master]"
    assert [h.name for h in inv.select(None, "worker")] == ["web1", "jobs1"]
    assert [r.name for r in inv.select(None, "worker")[0].roles] == ["worker"]
    with pytest.raises(HostSelectionError, match="matches no role"):
        inv.select(None, "wrker")


def test_config_output_names_each_values_table(tmp_path: Path, capsys) -> None:
    path = tmp_path / "inventory.toml"
    path.write_text((REPO / "examples" / "shop" / "inventory.toml").read_text())
    from deployer.cli import main

    try:
        main(["-i", str(path), "config", "--hosts", "web2,web1"])
    except SystemExit as e:
        assert e.code in (0, None)
    out = capsys.readouterr().out
    assert "[roles.web.master]  # /srv/shop/master-web.toml" in out
    assert "workers = 8  # [hosts.web2.roles.web.master]" in out
    assert 'ready = "notify"  # [master]' in out
    assert "[roles.worker.master]  # /srv/shop/master-worker.toml" in out
    assert 'socket = "/srv/shop/run/master-worker.sock"  # layout' in out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[hosts.x]\naddress = "h"\n', "[hosts.x] roles: required when [roles] is defined"),
        (
            '[hosts.x]\naddress = "h"\nroles = ["wbe"]\n',
            "[hosts.x] roles: no role named 'wbe' (did you mean 'web'?)",
        ),
        (
            '[hosts.x]\naddress = "h"\nroles = ["web"]\n[roles.web]\nhelth = {}\n',
            "[roles.web] helth: unknown key (did you mean 'health'?)",
        ),
        (
            '[hosts.x]\naddress = "h"\n[hosts.x.roles.web.master]\nworkers = 0\n',
            "[hosts.x.roles.web.master] workers: expected a positive integer",
        ),
        (
            '[hosts.x]\naddress = "h"\nroles = ["web"]\n[roles.Web.master]\ncommand = "x"\n',
            "[roles.Web]: role names are lowercase letters",
        ),
    ],
)
def test_bad_roles_are_named(tmp_path: Path, text: str, problem: str) -> None:
    base = '[app]\nname = "a"\ndeploy_to = "/srv/a"\n[roles.web.master]\ncommand = "x"\n'
    path = tmp_path / "inventory.toml"
    path.write_text(base + text)
    with pytest.raises(InventoryError) as e:
        inventory.load(path)
    assert problem in str(e.value), str(e.value)


def test_a_role_needs_its_command_somewhere(tmp_path: Path) -> None:
    path = tmp_path / "inventory.toml"
    path.write_text(
        '[app]\nname = "a"\ndeploy_to = "/srv/a"\n[master]\nworkers = 2\n'
        '[roles.web.master]\nlisten = "{address}:80"\n[roles.jobs]\n'
        '[hosts.x]\naddress = "h"\nroles = ["web", "jobs"]\n'
    )
    with pytest.raises(InventoryError) as e:
        inventory.load(path)
    text = str(e.value)
    assert "[roles.web.master] command: required key is missing" in text
    assert "[master] command: required key is missing" in text  # jobs inherits [master] only
    assert text.count("command: required key is missing") == 2  # once per table, not per host


def test_two_roles_on_one_host_may_not_share_a_port(tmp_path: Path) -> None:
    path = tmp_path / "inventory.toml"
    path.write_text(
        '[app]\nname = "a"\ndeploy_to = "/srv/a"\n[master]\nlisten = "{address}:80"\n'
        '[roles.web.master]\ncommand = "x"\n[roles.admin.master]\ncommand = "y"\n'
        '[hosts.x]\naddress = "h"\nroles = ["web", "admin"]\n'
    )
    with pytest.raises(InventoryError, match="listen h:80 is also used"):
        inventory.load(path)


def test_the_shop_example_has_a_staging_overlay_and_a_post_deploy_hook(tmp_path: Path) -> None:
    import os
    import subprocess

    shop = REPO / "examples" / "shop"
    inv = inventory.load(shop / "inventory.toml", "staging")
    web1 = inv.hosts["web1"]
    assert web1.address == "10.1.0.11" and web1.role_names == ["web", "worker"]
    assert web1.role("web").env["APP_ENV"] == "staging"
    assert web1.role("worker").env == {"APP_ENV": "staging", "QUEUE": "default"}
    cfg = web1.master_config("web")
    assert cfg is not None and cfg.socket == "/srv/shop-staging/run/master-web.sock"
    log = tmp_path / "deploys.log"
    env = {
        **os.environ,
        "DEPLOYER_APP": "shop",
        "DEPLOYER_DESTINATION": "staging",
        "DEPLOYER_RELEASE": "20261201000000-abcdef0",
        "DEPLOYER_PERFORMER": "ann",
        "DEPLOYER_RESULT": "ok",
        "DEPLOYER_DURATION": "4.20",
        "DEPLOYER_NOTIFY_LOG": str(log),
    }
    subprocess.run([shop / ".deployer" / "hooks" / "post-deploy"], env=env, check=True)
    assert log.read_text().endswith("shop (staging) 20261201000000-abcdef0 by ann: ok in 4.20s\n")


def test_the_shop_post_deploy_hook_says_when_it_runs_as_the_readme_does() -> None:
    """The hook's comment and the README's "Deploy hooks" table agree (issue 24.6i):
    post-deploy runs after a rollout that went well, so its result is only ever ok."""
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `post-deploy` |"))
    assert "after a rollout that went well" in row, row
    hook = (REPO / "examples" / "shop" / ".deployer" / "hooks" / "post-deploy").read_text()
    comment = " ".join(line.lstrip("# ") for line in hook.splitlines() if line.startswith("#"))
    assert "after a rollout that went well" in comment, comment
    assert 'DEPLOYER_RESULT is always "ok"' in comment
    assert "after every rollout" not in comment and "rolled-back" not in comment


def test_drift_and_doctor_per_role(shop: Project, ssh_hosts: list[SSHTestHost]) -> None:
    p = shop
    host1, _, host3 = ssh_hosts
    p.deployer("setup", check=True)
    proc = p.deployer("config", "--diff")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    toml = host3.root / "master-worker.toml"
    toml.write_text(toml.read_text().replace("workers = 2", "workers = 5"))
    proc = p.deployer("config", "--diff")
    assert proc.returncode == 1
    assert f"{host3.name}: DIFFERS" in proc.stdout
    assert "  - worker: workers: 5 on the host, 2 from the inventory" in proc.stdout
    assert f"{host1.name}: same as the inventory" in proc.stdout
    rows = json.loads(p.deployer("doctor", "--json").stdout)
    checks = {r["host"]: {c["check"]: c for c in r["checks"]} for r in rows}
    assert checks[host1.name]["listen web"]["status"] == "ok"
    assert checks[host1.name]["listen worker"]["status"] == "info"
    assert "binds no socket" in checks[host3.name]["listen worker"]["detail"]
