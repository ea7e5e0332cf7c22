"""The app's lifecycle from the controller: `deployer app reload|restart|stop|start|
scale|remove` on real sshd hosts running the master, under load where serving
workers are touched (0 failed requests)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import control, pid_alive
from rollout_helpers import APP, Project, master_extra, remove_unit, serving
from sshd import SSHTestHost

from deployer.loadgen import Load
from deployer.master import units


@pytest.fixture
def deployed(tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int) -> Iterator[Project]:
    hosts = ssh_hosts[:2]
    try:
        with serving(tmp_path, hosts, {"app.py": APP}, master_extra(port)) as project:
            yield project
    finally:
        for h in hosts:  # the units setup installed in the login user's home
            remove_unit(h)


def workers(host: SSHTestHost) -> set[int]:
    status = control(host.root / "run" / "master.sock", {"cmd": "status"})[-1]["status"]
    return {w["pid"] for w in status["workers"]}


def master_pid(host: SSHTestHost) -> int:
    return int((host.root / "run" / "master.pid").read_text())


def under_load(project: Project, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """`deployer ARGS` while every host takes requests; none of them may fail."""
    loads = [Load(port, threads=2, duration=120, address=h.address) for h in project.hosts]
    for load in loads:
        load.__enter__()
        load.wait_requests(20)
    try:
        proc = project.deployer(*args)
    finally:
        results = [load.stop() for load in loads]
    for h, result in zip(project.hosts, results, strict=True):
        assert result.ok > 0 and result.failed == 0, f"{h.name}: {result.summary()}"
    return proc


def test_reload_restart_and_scale_replace_workers_with_no_failed_request(
    deployed: Project, port: int
) -> None:
    hosts = deployed.hosts
    before = {h.name: workers(h) for h in hosts}
    masters = {h.name: master_pid(h) for h in hosts}
    out = under_load(deployed, port, "app", "reload")
    assert out.returncode == 0, out.stdout + out.stderr
    for h in hosts:  # every worker new, the master the same
        assert workers(h).isdisjoint(before[h.name]) and len(workers(h)) == 2
        assert master_pid(h) == masters[h.name]
    assert "reload ok in" in out.stdout and "healthy" in out.stdout
    assert out.stdout.index(f"{hosts[0].name}        healthy") < out.stdout.index(
        f"{hosts[1].name}        healthy"
    )  # the canary first, as a rollout switches

    again = {h.name: workers(h) for h in hosts}
    out = under_load(deployed, port, "app", "restart", "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(workers(h).isdisjoint(again[h.name]) for h in hosts)
    for h in hosts:  # -v: each worker's progress, and still the right count at the end
        assert f"{h.name}        reload: spawned: worker 1 pid" in out.stdout, out.stdout
        assert f"{h.name}        reload: 2 workers replaced in" in out.stdout, out.stdout

    out = under_load(deployed, port, "app", "scale", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    for h in hosts:
        assert len(workers(h)) == 3
        assert "workers = 3" in (h.root / "master.toml").read_text()
    diff = deployed.deployer("config", "--diff")
    assert (
        diff.returncode == 1 and "  - workers: 3 on the host, 2 from the inventory" in diff.stdout
    )
    status = deployed.deployer("status", "--json")
    assert status.returncode == 0, status.stdout
    assert all(row["master"]["configured"] == 3 for row in json.loads(status.stdout))
    history = json.loads(deployed.deployer("history", "--json", check=True).stdout)
    assert [e["action"] for e in history[:3]] == ["scale", "reload", "reload"]
    assert all(e["result"] == "ok" for e in history[:3])
    bad = deployed.deployer("app", "scale", "0")
    assert bad.returncode == 2 and "0 is not in the range 1<=x<=10000" in bad.stderr
    # setup writes the inventory's number again
    deployed.deployer("setup", check=True)
    assert deployed.deployer("config", "--diff").returncode == 0
    assert all(len(workers(h)) == 2 for h in hosts)


def test_stop_keeps_the_masters_down_through_a_reboot_until_start(
    deployed: Project, port: int
) -> None:
    hosts = deployed.hosts
    masters = [master_pid(h) for h in hosts]
    out = deployed.deployer("app", "stop")
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(not pid_alive(p) for p in masters)
    assert "stays down until `deployer app start`" in out.stdout
    status = deployed.deployer("status")
    assert status.returncode == 1
    assert "stopped by `deployer app stop` (`deployer app start` starts it)" in status.stdout
    for h in hosts:  # the unit's conditions keep it down at boot
        unit = json.loads((h.root / ".deployer" / "unit.json").read_text())
        text = Path(unit["path"]).read_text()
        assert f"ConditionPathExists=!{h.root}/run/master.stopped" in text
        assert (h.root / "run" / "master.stopped").exists()
    assert deployed.deployer("app", "stop").returncode == 0  # again: nothing to stop, fine

    out = deployed.deployer("app", "start")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "master started" in out.stdout and "healthy" in out.stdout
    assert not any((h.root / "run" / "master.stopped").exists() for h in hosts)
    deployed.deployer("status", check=True)
    # a rollout also starts a stopped master (a deploy is the word to run it)
    deployed.deployer("app", "stop", "--hosts", hosts[0].name, check=True)
    out = deployed.deployer("rollout", check=True).stdout
    assert "master was stopped by `deployer app stop`: starting it" in out, out
    deployed.deployer("status", check=True)


def test_remove_takes_the_masters_and_units_away_and_purge_deploy_to(
    deployed: Project,
) -> None:
    hosts = deployed.hosts
    units_of = {}
    for h in hosts:
        units_of[h.name] = json.loads((h.root / ".deployer" / "unit.json").read_text())
    out = deployed.deployer("app", "remove", "--hosts", hosts[0].name)
    assert out.returncode == 0, out.stdout + out.stderr
    h = hosts[0]
    assert not (h.root / "run" / "master.pid").exists() or not pid_alive(master_pid(h))
    assert not Path(units_of[h.name]["path"]).exists()
    assert not Path(units_of[h.name]["wants"]).is_symlink()
    assert not (h.root / "master.toml").exists()
    assert (h.root / "releases").is_dir()  # the releases stay without --purge
    assert f"unit {units_of[h.name]['unit']} disabled and removed" in out.stdout
    assert Path(units_of[hosts[1].name]["path"]).exists()  # the other host untouched

    refused = deployed.deployer("app", "remove", "--purge")
    assert refused.returncode == 2 and "add --yes" in refused.stderr
    assert all(h.root.is_dir() for h in hosts)
    out = deployed.deployer("app", "remove", "--purge", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not any(h.root.exists() for h in hosts)
    assert not Path(units_of[hosts[1].name]["path"]).exists()
    entry = json.loads(deployed.deployer("history", "--json", check=True).stdout)[0]
    assert entry["action"] == "remove" and entry["result"] == "ok"


def test_a_stopped_unit_is_skipped_at_boot() -> None:
    from deployer.hostapi.layout import Layout

    layout = Layout.at("/srv/shop", "web")
    assert units.boot_conditions(layout)[-1] == "!/srv/shop/run/master-web.stopped"
