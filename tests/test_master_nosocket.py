"""The master without a listening socket (no `listen`): queue consumers.

Real masters, real worker processes and signals. The worker is a consumer: it
"processes jobs" in a loop (a `start` and an `end` line per job in a shared
file, with its pid and release), says it is ready, and on SIGTERM finishes its
current job and exits 0. It gets no fd 3 and no LISTEN_* variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from master_helpers import (
    PYTHON,
    REPO,
    Master,
    Masters,
    Releases,
    control,
    free_port,
    master_cli,
    pid_alive,
    releases_of,
    wait_for,
)
from test_master_upgrade import code_that_cannot_adopt, previous_code

from deployer.hostapi import options
from deployer.master import config as config_mod
from deployer.master import units

CONSUMER = textwrap.dedent(
    """\
    import json, os, signal, socket, sys, time

    jobs = os.environ["JOBS_FILE"]
    pid = os.getpid()
    release = os.path.basename(os.environ.get("DEPLOYER_RELEASE") or os.getcwd())
    stopping = False


    def note(*words):
        # one write() per line on an O_APPEND file: lines of all workers never mix
        fd = os.open(jobs, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            line = " ".join(str(w) for w in (words[0], pid, release, *words[1:]))
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)


    def on_term(signum, frame):
        global stopping
        stopping = True
        note("term")


    signal.signal(signal.SIGTERM, on_term)
    fds = []
    for fd in range(3, 256):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            pass
    env = {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}
    env["DEPLOYER_READY_FD"] = os.environ.get("DEPLOYER_READY_FD")
    note("boot", json.dumps({"env": env, "fds": fds}, separators=(",", ":")))
    if os.path.exists(os.environ.get("CRASH_IF", "/nonexistent")):
        sys.exit(3)  # a consumer that cannot start (its queue is down, say)
    time.sleep(float(os.environ.get("BOOT_DELAY", "0")))
    note("ready")
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as u:
            u.sendto(b"READY=1", "\\0" + address[1:] if address.startswith("@") else address)
    if os.environ.get("DEPLOYER_READY_FD"):
        os.write(int(os.environ["DEPLOYER_READY_FD"]), b"READY=1\\n")
    n = 0
    while not stopping:
        n += 1
        note("start", n)
        time.sleep(float(os.environ.get("JOB_SECONDS", "0.05")))
        note("end", n)
    note("exit")
    sys.exit(0)
    """
)


@dataclass
class Line:
    kind: str  # boot | ready | start | end | term | exit
    pid: int
    release: str
    rest: str


def read_jobs(path: Path) -> list[Line]:
    if not path.exists():
        return []
    out = []
    for text in path.read_text().splitlines():
        kind, pid, release, *rest = text.split(" ", 3)
        out.append(Line(kind, int(pid), release, rest[0] if rest else ""))
    return out


def boot_info(lines: list[Line], pid: int) -> dict[str, Any]:
    return json.loads(next(x.rest for x in lines if x.kind == "boot" and x.pid == pid))


def assert_no_job_cut(lines: list[Line], pids: set[int] | None = None) -> None:
    """Every job started (by these workers) has its end line."""
    started = {(x.pid, x.rest) for x in lines if x.kind == "start"}
    ended = {(x.pid, x.rest) for x in lines if x.kind == "end"}
    if pids is not None:
        started = {s for s in started if s[0] in pids}
    assert started, "no job was started"
    assert started <= ended, sorted(started - ended)


def index_of(lines: list[Line], kind: str, pid: int) -> int:
    return next(i for i, x in enumerate(lines) if x.kind == kind and x.pid == pid)


@pytest.fixture
def consumer(tmp_path: Path) -> Path:
    path = tmp_path / "consumer.py"
    path.write_text(CONSUMER)
    return path


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    return tmp_path / "jobs.log"


def start_consumers(
    masters: Masters,
    consumer: Path,
    jobs: Path,
    workers: int = 2,
    ready: str = "notify",
    cwd: Path | None = None,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    sock: Path | None = None,
    wait: bool = True,
) -> Master:
    """A `master run` without --listen (the fixture kills it by pid at the end)."""
    n = len(masters.started)
    sock = sock or masters.tmp / f"c{n}.sock"
    log = masters.tmp / f"c{n}.log"
    argv = [PYTHON, "-m", "deployer.master", "run", "--workers", str(workers),
            "--ready", ready, "--socket", str(sock), "--log", str(log),
            "--ready-soak", "0.2", "--shutdown-timeout", "10", "--ready-timeout", "10",
            *extra]  # fmt: skip
    if cwd is not None:
        argv += ["--cwd", str(cwd)]
    argv += ["--", PYTHON, consumer.name if cwd is not None else str(consumer)]
    run_env = {**os.environ, "JOBS_FILE": str(jobs), **(env or {})}
    proc = subprocess.Popen(argv, cwd=REPO, env=run_env)
    m = Master(proc, sock, 0, log)
    masters.started.append(m)
    if wait:
        for w in m.wait_ready(workers):
            masters.worker_pids.add(w["pid"])
    return m


def wait_jobs(jobs: Path, pids: list[int] | set[int], n: int = 2, timeout: float = 10) -> None:
    """Until each of these workers has finished at least n jobs."""

    def done() -> bool:
        ends = [x.pid for x in read_jobs(jobs) if x.kind == "end"]
        return all(ends.count(p) >= n for p in pids)

    wait_for(done, timeout, f"{n} finished jobs of each of {sorted(pids)}")


def ends_of(jobs: Path, pid: int) -> int:
    return sum(1 for x in read_jobs(jobs) if x.kind == "end" and x.pid == pid)


# --- what the workers get --------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "ready, extra",
    [
        ("notify", ()),
        ("delay:0.3", ()),
        ("pipe", ()),
        # listen_fds and nonblocking mean nothing without a socket: accepted, ignored
        ("notify", ("--listen-fds", "4", "--nonblocking", "true")),
    ],
    ids=["notify", "delay", "pipe", "listen_fds-nonblocking-ignored"],
)
def test_workers_get_no_socket_and_no_listen_variables(
    masters: Masters, consumer: Path, jobs: Path, ready: str, extra: tuple[str, ...]
) -> None:
    # LISTEN_* in the master's own environment (not systemd's: LISTEN_PID is not its
    # pid) must not reach the workers either.
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x"}
    m = start_consumers(masters, consumer, jobs, ready=ready, extra=extra, env=env)
    pids = sorted(m.worker_pids())
    wait_jobs(jobs, pids)
    lines = read_jobs(jobs)
    for pid in pids:
        info = boot_info(lines, pid)
        if ready == "pipe":  # the readiness pipe takes the first free fd: 3
            assert info["env"] == {"DEPLOYER_READY_FD": "3"}, info
            assert 3 in info["fds"] and 4 not in info["fds"], info
        else:
            assert info["env"] == {"DEPLOYER_READY_FD": None}, info
            assert 3 not in info["fds"], info
    status = m.status()
    assert status["listen"] is None and status["listen_fds"] == 0
    assert status["ready"] == 2 and status["state"] == "running"
    assert status["ready_mode"] == ready
    assert "2 workers ready (no listening socket)" in m.log_text()
    human = m.cli("status")
    assert human.returncode == 0, human.stderr
    assert f"master pid {m.pid} running with no listening socket" in human.stdout
    assert "None" not in human.stdout.splitlines()[0]


# --- reload -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reload_replaces_every_worker_one_at_a_time_and_cuts_no_job(
    masters: Masters, consumer: Path, jobs: Path, tmp_path: Path
) -> None:
    rel = Releases(tmp_path / "app", app=consumer)
    rel.make("r1")
    rel.switch("r1")
    env = {"BOOT_DELAY": "0.3", "JOB_SECONDS": "0.2"}  # jobs are in flight at every SIGTERM
    extra = ("--reload-batch", "1")
    m = start_consumers(masters, consumer, jobs, workers=3, cwd=rel.current, env=env, extra=extra)
    old = sorted(m.worker_pids())
    wait_jobs(jobs, old, n=1)
    rel.make("r2")
    rel.switch("r2")
    answers = m.request({"cmd": "reload"}, timeout=40)
    assert answers[-1]["ok"], (answers, m.log_text())
    assert releases_of(m) == {"r2"}
    new = sorted(m.worker_pids())
    assert not set(old) & set(new)
    wait_for(lambda: not any(pid_alive(p) for p in old), 15, "the old workers to exit")
    wait_jobs(jobs, new, n=1)

    # the master's view: each slot's replacement was ready before its worker drained
    events = [(a["event"], a["worker"]) for a in answers if "worker" in a]
    at = {e: i for i, e in enumerate(events)}
    for slot in (1, 2, 3):
        assert at[("ready", slot)] < at[("draining", slot)], events
    assert at[("draining", 1)] < at[("draining", 2)] < at[("draining", 3)], events
    # reload_batch 1: slot 3's replacement waits for slot 1's promotion
    assert at[("draining", 1)] < at[("spawned", 3)], events

    # the workers' view: the new worker said ready before the old one got SIGTERM
    lines = read_jobs(jobs)
    by_slot = {}
    for a in answers:
        if a.get("event") in ("ready", "draining"):
            by_slot.setdefault(a["worker"], {})[a["event"]] = a["pid"]
    for pair in by_slot.values():
        assert index_of(lines, "ready", pair["ready"]) < index_of(lines, "term", pair["draining"])
    # never fewer than 3 workers consuming (ready, not yet told to stop)
    live, low, counting = set(), 3, False
    for x in lines:
        if x.kind == "ready":
            live.add(x.pid)
        elif x.kind == "term":
            live.discard(x.pid)
        counting = counting or len(live) == 3
        if counting:
            low = min(low, len(live))
    assert low == 3, low
    # no job cut: every old worker finished the job it was in, and exited 0
    assert_no_job_cut(lines, set(old))
    for pid in old:
        assert index_of(lines, "term", pid) < index_of(lines, "exit", pid)
        assert f"pid {pid} stopped (exited with code 0)" in m.log_text()
    assert {x.release for x in lines if x.kind == "start" and x.pid in new} == {"r2"}


@pytest.mark.timeout(60)
def test_sighup_reload_and_a_failing_replacement_keeps_the_old_workers(
    masters: Masters, consumer: Path, jobs: Path, tmp_path: Path
) -> None:
    rel = Releases(tmp_path / "app", app=consumer)
    rel.make("r1")
    rel.switch("r1")
    m = start_consumers(masters, consumer, jobs, cwd=rel.current)
    old = sorted(m.worker_pids())
    m.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: m.status()["reloads"] == 1, 20, "the SIGHUP reload")
    assert not set(old) & set(sorted(m.worker_pids()))
    # a release whose consumer cannot start: the reload fails, the workers go on
    bad = rel.make("bad")
    (bad / consumer.name).unlink()
    (bad / consumer.name).write_text("import sys; sys.exit(3)\n")
    rel.switch("bad")
    serving = sorted(m.worker_pids())
    r = m.cli("reload", "--wait", "--timeout", "30")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "exited with code 3" in r.stderr
    assert sorted(m.worker_pids()) == serving and releases_of(m) == {"r1"}
    before = {p: ends_of(jobs, p) for p in serving}
    wait_for(lambda: all(ends_of(jobs, p) > n for p, n in before.items()), 10, "jobs go on")


# --- crashes, stop -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_crashed_worker_is_restarted(masters: Masters, consumer: Path, jobs: Path) -> None:
    m = start_consumers(masters, consumer, jobs)
    victim = next(w for w in m.status()["workers"] if w["id"] == 1)
    os.killpg(victim["pid"], signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        s = m.status()
        w1 = [w for w in s["workers"] if w["id"] == 1]
        ok = s["crashes"] == 1 and s["ready"] == 2 and w1 and w1[0]["pid"] != victim["pid"]
        return w1[0] if ok else None

    w1 = wait_for(restarted, 15, f"slot 1 restarted; log:\n{m.log_text()}")
    assert w1["restarts"] == 1
    assert f"worker 1 pid {victim['pid']} crashed (killed by SIGKILL)" in m.log_text()
    wait_jobs(jobs, [w1["pid"]], n=1)
    crash = m.status()["recent_crashes"][-1]
    assert crash["pid"] == victim["pid"] and crash["how"] == "killed by SIGKILL"


@pytest.mark.timeout(60)
def test_a_crash_loop_backs_off_and_recovers(
    masters: Masters, consumer: Path, jobs: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    m = start_consumers(masters, consumer, jobs, workers=1, env={"CRASH_IF": str(broken)})
    first = sorted(m.worker_pids())[0]
    broken.write_text("")  # from now on every new worker exits 3 at once
    os.killpg(first, signal.SIGKILL)

    def looping() -> bool:
        loops = m.status()["crash_loops"]
        return bool(loops) and loops[0]["crashes_in_a_row"] >= 3

    wait_for(looping, 20, f"a crash loop; log:\n{m.log_text()}")
    assert "crash loop: restart in" in m.log_text()
    assert "exited with code 3" in m.log_text()
    broken.unlink()  # the queue is back: the next restart sticks
    w = m.wait_ready(1, timeout=30)[0]
    assert w["pid"] != first and m.status()["crashes"] >= 3
    wait_jobs(jobs, [w["pid"]], n=1)


@pytest.mark.timeout(60)
def test_sigterm_stops_gracefully_and_every_job_finishes(
    masters: Masters, consumer: Path, jobs: Path, tmp_path: Path
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    try:
        m = start_consumers(
            masters,
            consumer,
            jobs,
            env={"JOB_SECONDS": "0.3", "NOTIFY_SOCKET": str(tmp_path / "notify")},
        )
        ready = dict(x.split("=", 1) for x in notify.recv(4096).decode().splitlines())
        assert ready["READY"] == "1" and ready["MAINPID"] == str(m.pid)
        assert ready["STATUS"] == "2 workers ready (no listening socket)"
        pids = sorted(m.worker_pids())
        wait_jobs(jobs, pids, n=1)
        m.proc.send_signal(signal.SIGTERM)
        assert m.wait_exit(20) == 0
        assert "STOPPING=1" in notify.recv(4096).decode()
    finally:
        notify.close()
    lines = read_jobs(jobs)
    assert_no_job_cut(lines)
    for pid in pids:
        assert index_of(lines, "term", pid) < index_of(lines, "exit", pid)
        assert f"pid {pid} stopped (exited with code 0)" in m.log_text()
        assert not pid_alive(pid)
    assert not m.socket.exists()


# --- control socket, upgrade, handover, daemon ------------------------------------------------


@pytest.mark.timeout(60)
def test_control_socket_status_scale_reload_stop(
    masters: Masters, consumer: Path, jobs: Path
) -> None:
    m = start_consumers(masters, consumer, jobs)
    r = m.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["pid"] == m.pid and s["listen"] is None and s["listen_fds"] == 0
    assert s["config"]["listen"] is None and s["configured"] == 2
    assert m.cli("scale", "3").returncode == 0
    m.wait_ready(3)
    assert m.cli("scale", "1").returncode == 0
    m.wait_ready(1)
    r = m.cli("reload", "--wait", "--timeout", "30")
    assert r.returncode == 0 and "ok in" in r.stdout, r.stdout + r.stderr
    pid = sorted(m.worker_pids())[0]
    wait_jobs(jobs, [pid], n=1)
    r = m.cli("stop", "--timeout", "30")
    assert r.returncode == 0 and f"master {m.pid} stopped" in r.stdout, r.stdout + r.stderr
    assert m.wait_exit(15) == 0
    assert_no_job_cut(read_jobs(jobs))


@pytest.mark.timeout(60)
def test_upgrade_in_place_keeps_the_master_pid_and_the_workers(
    masters: Masters, consumer: Path, jobs: Path
) -> None:
    m = start_consumers(masters, consumer, jobs, ready="pipe")
    pids = sorted(m.worker_pids())
    wait_jobs(jobs, pids, n=1)
    for n in (1, 2):
        r = m.cli("upgrade", "--timeout", "30")
        assert r.returncode == 0, r.stdout + r.stderr + m.log_text()
        assert f"master pid {m.pid} upgraded in place on {REPO} " in r.stdout
        s = m.status()
        assert s["pid"] == m.pid and s["upgrades"] == n and s["listen"] is None
        assert sorted(m.worker_pids()) == pids and s["ready"] == 2
        before = {p: ends_of(jobs, p) for p in pids}
        wait_for(lambda b=before: all(ends_of(jobs, p) > c for p, c in b.items()), 10, "jobs")
    # the adopted master reloads (pipe readiness on fd 3 again) and stops as before
    r = m.cli("reload", "--wait", "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    new = sorted(m.worker_pids())
    assert not set(new) & set(pids)
    assert all(boot_info(read_jobs(jobs), p)["env"] == {"DEPLOYER_READY_FD": "3"} for p in new)
    assert m.cli("stop", "--timeout", "30").returncode == 0
    assert m.wait_exit(15) == 0
    assert_no_job_cut(read_jobs(jobs))


@pytest.mark.timeout(90)
def test_upgrade_to_code_before_this_mode_is_refused_and_a_failed_adoption_goes_back(
    masters: Masters, consumer: Path, jobs: Path, tmp_path: Path
) -> None:
    """The previous code would wrap the missing listener fd as a new socket: the
    state's version (2) makes its check refuse, and nothing changes. Code that
    passes its check but cannot adopt execs back to this code, which reads it."""
    m = start_consumers(masters, consumer, jobs)
    pids = sorted(m.worker_pids())
    previous = previous_code(tmp_path)
    r = m.cli("upgrade", "--code", str(previous), "--timeout", "60")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed its check, nothing changed" in r.stderr and "state version 2" in r.stderr
    code = code_that_cannot_adopt(tmp_path)
    answers = m.request({"cmd": "upgrade", "code": str(code)}, timeout=30)
    assert answers[-1]["ok"] is False and answers[-1]["pid"] == m.pid, answers
    assert f"back on the previous code {REPO}," in answers[-1]["error"]
    s = m.status()
    assert s["pid"] == m.pid and s["upgrades"] == 0 and s["listen"] is None
    assert sorted(m.worker_pids()) == pids and s["ready"] == 2
    before = {p: ends_of(jobs, p) for p in pids}
    wait_for(lambda: all(ends_of(jobs, p) > c for p, c in before.items()), 10, "jobs go on")
    boot = [x for x in read_jobs(jobs) if x.kind == "boot"]
    assert {x.pid for x in boot} == set(pids)  # no worker was started anew


@pytest.mark.timeout(60)
def test_upgrade_reconfigure_keeps_no_listen_and_refuses_to_add_one(
    masters: Masters, consumer: Path, jobs: Path, tmp_path: Path
) -> None:
    m = start_consumers(masters, consumer, jobs)
    toml = tmp_path / "master.toml"

    def write(**extra: Any) -> None:
        cfg = options.build(
            {"command": (PYTHON, str(consumer)), "socket": str(m.socket), "log": str(m.log)},
            extra,
        )
        toml.write_text(options.to_toml(cfg))

    write(listen=f"127.0.0.1:{free_port()}")
    r = m.cli("upgrade", "--reconfigure", "--config", str(toml))
    assert r.returncode == 1 and "listen unset -> 127.0.0.1:" in r.stderr, r.stderr
    assert "takes a restart of the master" in r.stderr
    write(shutdown_timeout=7.0)
    r = m.cli("upgrade", "--reconfigure", "--config", str(toml), "--timeout", "30")
    assert r.returncode == 0, r.stdout + r.stderr
    s = m.status()
    assert s["config"]["shutdown_timeout"] == 7.0 and s["listen"] is None and s["upgrades"] == 1


@pytest.mark.timeout(60)
def test_run_takes_over_a_master_without_a_socket(
    masters: Masters, consumer: Path, jobs: Path
) -> None:
    old = start_consumers(masters, consumer, jobs, env={"JOB_SECONDS": "0.2"})
    old_pids = sorted(old.worker_pids())
    wait_jobs(jobs, old_pids, n=1)
    # `master run` on the same control socket: the unit taking over a daemon
    new = start_consumers(masters, consumer, jobs, sock=old.socket, wait=False)
    assert old.wait_exit(30) == 0, new.log_text()
    new.wait_ready(2)
    s = new.status()
    assert s["pid"] == new.pid and s["listen"] is None
    assert not set(sorted(new.worker_pids())) & set(old_pids)
    assert f"took over from master pid {old.pid}" in new.log_text()
    assert "handover: no listening socket for" in old.log_text()
    lines = read_jobs(jobs)
    assert_no_job_cut(lines, set(old_pids))
    assert all(not pid_alive(p) for p in old_pids)


@pytest.mark.timeout(60)
def test_take_over_with_a_listen_binds_it(masters: Masters, consumer: Path, jobs: Path) -> None:
    """From a master without a socket the new one gets none: it binds its own listen."""
    old = start_consumers(masters, consumer, jobs, workers=1)
    port = free_port()
    new = start_consumers(
        masters,
        consumer,
        jobs,
        workers=1,
        sock=old.socket,
        wait=False,
        extra=("--listen", f"127.0.0.1:{port}"),
    )
    assert old.wait_exit(30) == 0, new.log_text()
    new.wait_ready(1)
    assert new.status()["listen"] == f"127.0.0.1:{port}"
    info = boot_info(read_jobs(jobs), sorted(new.worker_pids())[0])
    assert info["env"]["LISTEN_FDS"] == "1" and 3 in info["fds"]


@pytest.mark.timeout(60)
def test_start_daemonizes_without_a_socket(consumer: Path, jobs: Path, tmp_path: Path) -> None:
    sock, pidfile = tmp_path / "d.sock", tmp_path / "d.pid"
    env_jobs = {"JOBS_FILE": str(jobs)}
    argv = ["start", "--workers", "2", "--socket", str(sock), "--pidfile", str(pidfile),
            "--ready-soak", "0.2", "--", PYTHON, str(consumer)]  # fmt: skip
    pid = None
    try:
        r = subprocess.run(
            [PYTHON, "-m", "deployer.master", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, **env_jobs},
        )
        if pidfile.exists():
            pid = int(pidfile.read_text())
        assert r.returncode == 0, r.stdout + r.stderr
        assert "2 workers ready (no listening socket)" in r.stdout
        status = control(sock, {"cmd": "status"})[-1]["status"]
        assert status["pid"] == pid and status["listen"] is None
        r = master_cli("stop", "--socket", str(sock), "--timeout", "30")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not pid_alive(pid), 15, "the daemon to exit")
        assert not pidfile.exists()
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- configuration: master.toml, the unit, the flags -------------------------------------


def test_listen_is_optional_everywhere_and_absent_from_what_is_written(tmp_path: Path) -> None:
    assert options.BY_KEY["listen"].required is False
    assert "without it the master binds nothing" in options.BY_KEY["listen"].help
    cfg = options.build({"command": ("worker.py",), "workers": 2, "socket": "/run/m.sock"})
    assert cfg.listen is None
    text = options.to_toml(cfg)
    assert "listen =" not in text
    path = tmp_path / "master.toml"
    path.write_text(text)
    back = config_mod.build(config_mod.load_file(str(path)), {})
    assert back.listen is None and back.command == ("worker.py",)
    # the upgrade state's config round-trips too
    assert options.MasterConfig.from_dict(back.to_dict()) == back
    unit = units.render(back)
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    words = shlex.split(exec_start[len("ExecStart=") :])
    assert "--listen" not in words and words[-2:] == ["--", "worker.py"], words
    assert "Type=notify" in unit and ".socket" not in unit
    with pytest.raises(options.ConfigError, match="--socket-unit: needs --listen"):
        units.render(back, socket_unit=True)


@pytest.mark.timeout(30)
def test_unit_and_flags_without_listen(consumer: Path) -> None:
    r = master_cli("unit", "--workers", "2", "--", PYTHON, str(consumer))
    assert r.returncode == 0, r.stderr
    assert "--listen " not in r.stdout and "ExecStart=" in r.stdout
    r = master_cli("unit", "--socket-unit", "--", PYTHON, str(consumer))
    assert r.returncode == 2 and "--socket-unit: needs --listen" in r.stderr
