"""A keeper SIGKILLed in the middle of rollouts and rollbacks (issue 27): 3 sshd
hosts serving under load, the keeper ([ssh] persist) killed by pid at random
moments of each command. Every command tells the truth and leaves the fleet whole:
exit 0 with every host on the new release, or exit 1 with every host back on the
release it ran; no lock left; no failed request; the next rollout exits 0."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from master_helpers import free_port
from rollout_helpers import APP, Project, commit, make_project, master_extra, stop_masters
from test_keeper import keeper_pid, persisting, wait_gone

from deployer.loadgen import Load

KILLS = 20  # at least this many keepers killed while a command ran


def start(project: Project, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(project.state)}
    argv = [sys.executable, "-m", "deployer", "-i", str(project.inventory), *args]
    return subprocess.Popen(
        argv, cwd=project.repo, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def kill_keepers(project: Project, proc: subprocess.Popen[str], monkeypatch, rng) -> list[int]:
    """While `proc` runs: twice, at a random moment (its first 5 s), SIGKILL whichever
    keeper serves the project then. The pids killed."""
    killed: list[int] = []
    began = time.monotonic()
    for at in sorted(rng.uniform(0.2, 5.0) for _ in range(2)):
        while time.monotonic() - began < at:
            if proc.poll() is not None:
                return killed
            time.sleep(0.01)
        pid = keeper_pid(project, monkeypatch)
        if pid is not None and proc.poll() is None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def releases_of(project: Project) -> dict[str, str | None]:
    return {h.name: project.current(h) for h in project.hosts}


def no_lock_left(project: Project) -> list[str]:
    left = [str(p) for p in project.state.glob("*.lock")]
    left += [h.name for h in project.hosts if (h.root / "run" / "deploy.lock").exists()]
    return left


@pytest.mark.timeout(900)
def test_keepers_killed_at_random_moments_leave_no_host_failed(
    tmp_path: Path, ssh_hosts, monkeypatch
) -> None:
    port = free_port()
    project = persisting(
        make_project(tmp_path, ssh_hosts, {"app.py": APP}, extra=master_extra(port)), 30
    )
    project.deployer("setup", check=True)
    project.deployer("rollout", check=True)
    rng = random.Random(int(os.environ.get("KEEPER_KILL_SEED", "27")))
    loads = [Load(port, threads=1, duration=800, address=h.address) for h in project.hosts]
    kills, outcomes, version = 0, [], 1
    try:
        for load in loads:
            load.__enter__()
            load.wait_requests(5)
        while kills < KILLS:
            before = releases_of(project)
            if len(outcomes) % 3 == 2:  # every third command a rollback
                args: tuple[str, ...] = ("rollback",)
            else:
                version += 1
                commit(project.repo, {"app.py": APP + f"\n# v{version}\n"}, f"v{version}")
                args = ("rollout",)
            proc = start(project, *args)
            killed: list[int] = []
            killer = threading.Thread(
                target=lambda p=proc, k=killed: k.extend(kill_keepers(project, p, monkeypatch, rng))
            )
            killer.start()
            out, _ = proc.communicate(timeout=300)
            killer.join()
            assert all(wait_gone(pid) for pid in killed)
            kills += len(killed)
            after = releases_of(project)
            assert "Traceback" not in out, out
            if proc.returncode == 0:
                assert len(set(after.values())) == 1 and after != before, out
            else:
                assert proc.returncode == 1, out
                assert after == before, out  # every switched host back where it was
            assert no_lock_left(project) == [], out
            outcomes.append((args[0], proc.returncode, len(killed)))
        results = [load.stop() for load in loads]
        commit(project.repo, {"app.py": APP + "\n# after\n"}, "after")
        project.deployer("rollout", check=True)
    finally:
        for load in loads:
            load.stopped.set()
        stop_masters(project.hosts)
        project.deployer("disconnect")  # the last keeper, by its pid
    failed = {h.name: r.failed for h, r in zip(project.hosts, results, strict=True)}
    print(json.dumps({"kills": kills, "commands": outcomes, "failed_requests": failed}))
    assert failed == dict.fromkeys(failed, 0), [r.summary() for r in results]


@pytest.mark.timeout(600)
def test_a_keeper_killed_during_a_health_probe_ten_times_in_a_row(
    tmp_path: Path, ssh_hosts, monkeypatch
) -> None:
    """The case a rollout met about one run in four before: the keeper SIGKILLed
    while host2's health probe is in flight. Ten rollouts, each with its kill: each
    asks the probe again on a fresh session and ends with exit 0."""
    from test_rollout import HealthServer, with_health

    project = persisting(make_project(tmp_path, ssh_hosts, {"app.txt": "v1\n"}), 30)
    victim = project.hosts[1]
    killed: list[int] = []
    switched: dict[str, str | None] = {}

    def kill_in_host2s_probe(_hit: int) -> None:
        # the first probe once host2 switched is its own health check
        if switched and project.current(victim) != switched["from"] and "pid" not in switched:
            pid = keeper_pid(project, monkeypatch)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                switched["pid"] = str(pid)
                time.sleep(0.3)  # the probe answers only once the keeper is gone

    health = HealthServer(on_request=kill_in_host2s_probe)
    try:
        with_health(project, health.url)
        project.deployer("setup", check=True)
        project.deployer("rollout", check=True)
        for n in range(10):
            commit(project.repo, {"app.txt": f"v{n + 2}\n"}, f"v{n + 2}")
            switched.clear()
            switched["from"] = project.current(victim)
            proc = project.deployer("rollout")
            assert proc.returncode == 0, (n, proc.stdout + proc.stderr)
            asked = f"{victim.name}        deployer's keeper went away during health: asked again"
            assert asked in proc.stdout, (n, proc.stdout)
            assert len({project.current(h) for h in project.hosts}) == 1
            assert no_lock_left(project) == []
    finally:
        health.close()
        project.deployer("disconnect")
    assert len(killed) == 10 and all(wait_gone(pid) for pid in killed)
