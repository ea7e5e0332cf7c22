"""The resident cluster master with real processes, sockets and signals:
reloads under load, bad releases, crashes, stop, control socket, scale."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from guarantee_helpers import InFlight, Stream
from master_helpers import (
    NODE_APP,
    PYTHON,
    PYTHON_APP,
    REPO,
    Load,
    Master,
    Masters,
    Releases,
    control,
    pid_alive,
    releases_of,
    wait_for,
)


def assert_no_failures(load: Load) -> None:
    result = load.stop()
    assert result.failed == 0, result.summary()
    assert result.ok > 100, result.summary()


# --- reload ---


@pytest.mark.timeout(60)
def test_reload_under_load_switches_release_with_zero_failures(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current)
    old_pids = {w["pid"] for w in m.status()["workers"]}
    with Load(m.port, duration=30) as load:
        load.wait_requests(200)
        for name in ("r2", "r3"):
            releases.make(name)
            releases.switch(name)
            before = load.result.ok
            r = m.cli("reload", "--wait")
            assert r.returncode == 0, r.stderr + m.log_text()
            assert "ok in" in r.stdout and f"releases/{name}" in r.stdout
            assert {"spawned", "ready", "draining", "stopped"} <= {
                line.split(":")[0] for line in r.stdout.splitlines()
            }
            assert releases_of(m) == {name}
            load.wait_requests(before + 200)
        assert_no_failures(load)
    status = m.status()
    assert status["reloads"] == 2 and status["release"].endswith("releases/r3")
    assert not old_pids & {w["pid"] for w in status["workers"]}
    assert not any(pid_alive(p) for p in old_pids)
    assert load.result.bodies["r3"] > 0


@pytest.mark.timeout(90)
def test_twenty_reloads_in_a_loop_under_load_zero_failures(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current, options=("--ready-soak", "0.1"))
    durations = []
    with Load(m.port, threads=6, duration=75) as load:
        load.wait_requests(100)
        for i in range(20):
            before = load.result.ok
            started = time.monotonic()
            answers = m.request({"cmd": "reload"}, timeout=30)
            durations.append(time.monotonic() - started)
            assert answers[-1]["ok"], (i, answers, m.log_text()[-3000:])
            load.wait_requests(before + 20)
        assert_no_failures(load)
    assert m.status()["reloads"] == 20
    assert sorted(durations)[10] < 5, durations


@pytest.mark.timeout(60)
def test_next_replacement_boots_while_the_previous_one_soaks(
    masters: Masters, releases: Releases
) -> None:
    options = ("--ready-soak", "1", "--reload-batch", "1")
    m = masters.start(cwd=releases.current, workers=3, options=options)
    answers = m.request({"cmd": "reload"}, timeout=30)
    assert answers[-1]["ok"], answers
    events = [(a["event"], a["worker"]) for a in answers if "worker" in a]
    at = {e: i for i, e in enumerate(events)}
    # Slot 2's replacement is spawned before slot 1's old worker drains, and each old
    # worker drains only after its own replacement was ready.
    assert at[("spawned", 2)] < at[("draining", 1)], events
    for slot in (1, 2, 3):
        assert at[("ready", slot)] < at[("draining", slot)], events
    # Never more than 2 candidates (reload_batch 1): slot 3 waits for slot 1's promotion.
    assert at[("draining", 1)] < at[("spawned", 3)], events


@pytest.mark.timeout(60)
def test_signals_hup_and_usr2_reload(masters: Masters, releases: Releases) -> None:
    m = masters.start(cwd=releases.current)
    for n, sig in enumerate((signal.SIGHUP, signal.SIGUSR2), start=1):
        old = {w["pid"] for w in m.status()["workers"]}
        m.proc.send_signal(sig)
        wait_for(lambda n=n: m.status()["reloads"] == n, 20, f"reload {n}")
        assert not old & {w["pid"] for w in m.status()["workers"]}


@pytest.mark.timeout(60)
def test_reload_requested_during_a_reload_is_queued_not_interleaved(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current, options=("--ready-soak", "0.5"))
    releases.make("r2")
    releases.switch("r2")
    first = Stream(m.socket, {"cmd": "reload"})
    first.until(lambda a: a.get("event") == "started")
    # Reload 1 runs (its workers soak 0.5 s at least): the next request is queued.
    releases.make("r3")
    releases.switch("r3")
    second = Stream(m.socket, {"cmd": "reload"})
    assert second.next() == {"event": "queued", "reload": 2, "behind": 1}
    one, two = first.finish(), second.finish()
    assert one["ok"] and one["reload"] == 1 and one["release"].endswith("releases/r2"), one
    assert two["ok"] and two["reload"] == 2 and two["release"].endswith("releases/r3"), two
    # Not interleaved: reload 2 started from the release reload 1 had pinned, and
    # each reload spawned workers of its own release only.
    (started,) = [a for a in second.answers if a.get("event") == "started"]
    assert started["from"].endswith("releases/r2"), second.answers

    def spawned(stream: Stream) -> set[str]:
        return {
            os.path.basename(a["release"]) for a in stream.answers if a.get("event") == "spawned"
        }

    assert spawned(first) == {"r2"} and spawned(second) == {"r3"}
    assert m.status()["reloads"] == 2 and releases_of(m) == {"r3"}


# --- bad releases ---


@pytest.mark.timeout(60)
def test_bad_release_crashing_at_boot_keeps_old_workers_zero_failures(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current)
    old = {w["pid"] for w in m.status()["workers"]}
    releases.make("bad", CRASH_AT_BOOT="1")
    releases.switch("bad")
    with Load(m.port, duration=30) as load:
        load.wait_requests(100)
        r = m.cli("reload", "--wait")
        load.wait_requests(load.result.ok + 100)
        assert_no_failures(load)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "exited with code 3 before it was ready" in r.stderr
    assert "CRASH_AT_BOOT set: failing on purpose" in r.stderr  # its stderr tail
    status = m.status()
    assert {w["pid"] for w in status["workers"]} == old
    assert status["release"].endswith("releases/r1") and releases_of(m) == {"r1"}
    assert status["failed_reloads"] == 1 and status["last_reload"]["ok"] is False
    assert load.result.bodies.keys() == {"r1"}


@pytest.mark.timeout(60)
def test_bad_release_never_ready_times_out_and_is_killed(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current, options=("--ready-timeout", "1.5"))
    old = {w["pid"] for w in m.status()["workers"]}
    releases.make("stuck", NEVER_READY="1")
    releases.switch("stuck")
    with Load(m.port, duration=30) as load:
        load.wait_requests(100)
        answers = m.request({"cmd": "reload"}, timeout=30)
        assert_no_failures(load)
    assert answers[-1]["ok"] is False
    assert "not ready within ready_timeout (1.5s" in answers[-1]["error"]
    spawned = [a["pid"] for a in answers if a.get("event") == "spawned"]
    assert spawned and not any(pid_alive(p) for p in spawned)
    assert {w["pid"] for w in m.status()["workers"]} == old


@pytest.mark.timeout(60)
def test_failed_reload_converts_already_replaced_slots_back(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current, workers=3, options=("--reload-batch", "1"))
    # The 3rd worker of this release crashes at boot. It boots once slot 1's
    # replacement has soaked and slot 1 is converted (one worker at a time).
    releases.make("flaky", CRASH_AFTER_BOOTS="2")
    releases.switch("flaky")
    with Load(m.port, duration=30) as load:
        load.wait_requests(100)
        answers = m.request({"cmd": "reload"}, timeout=30)
        load.wait_requests(load.result.ok + 100)
        assert_no_failures(load)
    events = [a.get("event") for a in answers]
    assert answers[-1]["ok"] is False and "aborting" in events, answers
    reverted = [a for a in answers if a.get("phase") == "revert" and a.get("event") == "ready"]
    # Slot 1 is converted by then; slot 2 too if its soak ended before the crash.
    assert 1 <= len(reverted) <= 2, answers
    assert all(r["release"].endswith("releases/r1") for r in reverted)
    assert releases_of(m) == {"r1"}
    assert len(m.ready_workers()) == 3


# --- crashes ---


@pytest.mark.timeout(60)
def test_crashed_worker_is_replaced_from_pinned_release(
    masters: Masters, releases: Releases
) -> None:
    m = masters.start(cwd=releases.current)
    # `current` moves on without a reload: a crash restart must not pick it up.
    releases.make("r2")
    releases.switch("r2")
    victim = m.status()["workers"][0]
    started = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: victim["pid"] not in {w["pid"] for w in m.ready_workers()}, 5, "the reap")
    m.wait_ready(2)
    took = time.monotonic() - started
    status = m.status()
    assert took < 2.0, took
    assert status["crashes"] == 1 and releases_of(m) == {"r1"}
    replacement = next(w for w in status["workers"] if w["id"] == victim["id"])
    assert replacement["pid"] != victim["pid"] and replacement["restarts"] == 1


@pytest.mark.timeout(60)
def test_crash_loop_backs_off_instead_of_fork_bombing(masters: Masters, tmp_path: Path) -> None:
    m = masters.start(workers=1, env={"CRASH_AT_BOOT": "1"}, wait=False)
    wait_for(lambda: m.socket.exists(), 10, "control socket")
    time.sleep(4)
    status = m.status()
    # Restarts at about 0, 0.5, 1, 2 s after the first crash: a handful, not hundreds.
    assert 3 <= status["crashes"] <= 7, status
    assert status["state"] == "starting"
    (loop,) = status["crash_loops"]
    assert loop["crashes_in_a_row"] >= 3
    assert "crash loop: restart in" in m.log_text()


# --- stop ---


@pytest.mark.timeout(60)
def test_sigterm_lets_an_in_flight_request_finish(masters: Masters) -> None:
    m = masters.start()
    workers = [w["pid"] for w in m.status()["workers"]]
    request = InFlight(m.port, "/slow?s=3")
    request.wait_read()
    started = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    status, body = request.response()
    assert status == 200 and "slow ok" in body, body
    assert m.wait_exit(15) == 0
    assert time.monotonic() - started >= 2.0
    assert not any(pid_alive(p) for p in workers)
    assert not m.socket.exists()


@pytest.mark.timeout(60)
def test_stop_command_waits_for_drain_and_exits_zero(masters: Masters) -> None:
    m = masters.start()
    request = InFlight(m.port, "/slow?s=2")
    request.wait_read()
    r = m.cli("stop", "--timeout", "20")
    assert r.returncode == 0, r.stderr
    assert f"master {m.pid} stopped" in r.stdout
    assert m.wait_exit(5) == 0
    assert request.response()[0] == 200


@pytest.mark.timeout(60)
def test_second_sigint_stops_at_once(masters: Masters) -> None:
    m = masters.start()
    workers = [w["pid"] for w in m.status()["workers"]]
    request = InFlight(m.port, "/slow?s=20")
    request.wait_read()
    m.proc.send_signal(signal.SIGINT)
    # first SIGINT: a graceful stop, still draining the slow request
    wait_for(lambda: m.status()["state"] == "stopping", 10, "the graceful stop")
    assert m.proc.poll() is None
    started = time.monotonic()
    m.proc.send_signal(signal.SIGINT)
    m.wait_exit(5)
    assert time.monotonic() - started < 2
    with pytest.raises(OSError):  # the slow request was cut, as asked
        request.response()
    assert not any(pid_alive(p) for p in workers)


@pytest.mark.timeout(60)
def test_master_sigkill_leaves_no_workers_and_a_new_master_serves(masters: Masters) -> None:
    m = masters.start()
    workers = [w["pid"] for w in m.status()["workers"]]
    m.proc.kill()
    m.wait_exit(5)
    wait_for(lambda: not any(pid_alive(p) for p in workers), 2, "workers to die with the master")
    m2 = masters.start()
    assert m2.get("/")[0] == 200


# --- control socket ---


@pytest.mark.timeout(30)
def test_control_socket_is_0600_and_refuses_other_uids(masters: Masters) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    # pytest's tmp dirs are 0700: put the socket where another uid can reach it.
    shared = Path(tempfile.mkdtemp(prefix="deployer-master-test-"))
    shared.chmod(0o755)
    try:
        m = masters.start(workers=1, sock=shared / "m.sock")
        assert stat.S_IMODE(os.stat(m.socket).st_mode) == 0o600
        assert "not allowed" in connect_as_nobody(m.socket)  # refused by the file mode
        os.chmod(m.socket, 0o666)  # even with the file opened up, the uid check refuses
        answer = connect_as_nobody(m.socket)
        assert '"ok":false' in answer and "uid 65534 is not allowed" in answer, answer
        assert m.proc.poll() is None and m.status()["state"] == "running"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def connect_as_nobody(path: Path) -> str:
    probe = (
        "import os, socket, sys; os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    sys.exit(print('connect: not allowed'))\n"
        "try:\n"
        '    s.sendall(b\'{"cmd": "stop"}\\n\')\n'
        "except OSError:\n"
        "    pass  # refused and closed before we sent: the answer is still waiting\n"
        "print(s.recv(4096).decode())"
    )
    r = subprocess.run([PYTHON, "-c", probe, str(path)], capture_output=True, text=True)
    return r.stdout + r.stderr


@pytest.mark.timeout(30)
def test_unknown_control_command_is_an_error_answer(masters: Masters) -> None:
    m = masters.start(workers=1)
    (answer,) = control(m.socket, {"cmd": "explode"})
    assert answer["ok"] is False and "unknown command" in answer["error"]


@pytest.mark.timeout(60)
def test_scale_up_and_down(masters: Masters) -> None:
    m = masters.start(workers=1)
    r = m.cli("scale", "3")
    assert r.returncode == 0 and "workers: 1 -> 3" in r.stdout, r.stderr
    pids = {w["pid"] for w in m.wait_ready(3)}
    r = m.cli("scale", "1")
    assert r.returncode == 0
    (left,) = m.wait_ready(1)
    assert left["id"] == 1 and left["pid"] in pids
    assert m.cli("scale", "0").returncode == 2


@pytest.mark.timeout(30)
def test_status_json_has_the_documented_fields(masters: Masters, releases: Releases) -> None:
    m = masters.start(cwd=releases.current)
    r = m.cli("status", "--json")
    assert r.returncode == 0
    s = json.loads(r.stdout)
    assert s["pid"] == m.pid and s["release"].endswith("releases/r1")
    assert s["configured"] == 2 and s["ready"] == 2
    for key in ("reloads", "failed_reloads", "crashes", "state", "rss", "listen"):
        assert key in s
    for w in s["workers"]:
        for key in ("id", "pid", "state", "release", "started_at", "restarts", "rss"):
            assert key in w, key
        assert w["state"] == "ready" and w["rss"] > 1_000_000
    human = m.cli("status")
    assert human.returncode == 0 and f"master pid {m.pid} running" in human.stdout


# --- readiness modes ---


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["pipe", "delay:0.3"])
def test_other_readiness_modes(masters: Masters, mode: str) -> None:
    m = masters.start(options=("--ready", mode))
    assert m.get("/")[0] == 200
    assert m.request({"cmd": "reload"}, timeout=20)[-1]["ok"]


@pytest.mark.timeout(30)
def test_worker_environment_follows_socket_activation(masters: Masters, tmp_path: Path) -> None:
    probe = (
        "import os, socket, sys;"
        "s = socket.socket(fileno=3);"
        "print('ENV', os.environ['LISTEN_PID'] == str(os.getpid()), os.environ['LISTEN_FDS'],"
        " os.getpgrp() == os.getpid(), s.getsockname()[1], flush=True);"
        "a = os.environ['NOTIFY_SOCKET'];"
        "u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM);"
        "u.sendto(b'READY=1', '\\0' + a[1:]);"
        "import time; time.sleep(60)"
    )
    m = masters.start(command=[PYTHON, "-c", probe], workers=1)
    wait_for(lambda: "ENV" in m.log_text(), 5, "probe output")
    line = next(x for x in m.log_text().splitlines() if "ENV" in x)
    assert line.endswith(f"ENV True 1 True {m.port}"), line
    assert "[worker 1 pid" in line


@pytest.mark.timeout(30)
def test_listen_fds_passes_copies_of_the_one_socket(masters: Masters) -> None:
    # fds 3, 4, 5: the same listening socket (same inode); the ready pipe moves to 6.
    probe = (
        "import os, socket;"
        "n = int(os.environ['LISTEN_FDS']);"
        "inodes = {os.fstat(3 + i).st_ino for i in range(n)};"
        "ports = {socket.socket(fileno=os.dup(3 + i)).getsockname()[1] for i in range(n)};"
        "print('FDS', n, os.environ['LISTEN_FDNAMES'], len(inodes), *ports,"
        " os.environ['DEPLOYER_READY_FD'], flush=True);"
        "os.write(int(os.environ['DEPLOYER_READY_FD']), b'READY=1\\n');"
        "import time; time.sleep(60)"
    )
    m = masters.start(
        command=[PYTHON, "-c", probe], workers=1, options=("--ready", "pipe", "--listen-fds", "3")
    )
    wait_for(lambda: "FDS" in m.log_text(), 5, "probe output")
    line = next(x for x in m.log_text().splitlines() if "FDS" in x)
    assert line.endswith(f"FDS 3 listen:listen:listen 1 {m.port} 6"), line
    assert m.status()["listen_fds"] == 3


@pytest.mark.timeout(60)
def test_master_sigkill_also_kills_a_wrappers_children(masters: Masters) -> None:
    # `sh -c '...; exit'` keeps sh as the worker and runs the app as its child,
    # like `npm start`: PDEATHSIG reaches sh only, the guard kills the group.
    wrapper = ["sh", "-c", f'{PYTHON} "$0"; exit $?', str(PYTHON_APP)]
    m = masters.start(command=wrapper, workers=2)
    assert m.get("/")[0] == 200
    leaders = [w["pid"] for w in m.status()["workers"]]
    apps = [p for p in all_pids() if os.getpgid(p) in leaders and p not in leaders]
    assert len(apps) == 2
    m.proc.kill()
    m.wait_exit(5)
    wait_for(lambda: not any(pid_alive(p) for p in leaders + apps), 2, "the whole groups to die")
    assert masters.start().get("/")[0] == 200


def all_pids() -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                os.getpgid(int(name))
                out.append(int(name))
    return out


@pytest.mark.timeout(60)
def test_graceful_stop_waits_for_a_wrappers_children(masters: Masters) -> None:
    wrapper = ["sh", "-c", f'{PYTHON} "$0"; exit $?', str(PYTHON_APP)]
    m = masters.start(command=wrapper, workers=1)
    request = InFlight(m.port, "/slow?s=2")
    request.wait_read()
    m.proc.send_signal(signal.SIGTERM)
    assert request.response()[0] == 200
    assert m.wait_exit(15) == 0


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_app_reload_under_load_zero_failures(masters: Masters, tmp_path: Path) -> None:
    releases = Releases(tmp_path / "node", app=NODE_APP)
    releases.make("r1")
    releases.switch("r1")
    # Several listening handles per worker (see the app): each is drained on SIGTERM.
    m = masters.start(
        command=["node", NODE_APP.name],
        cwd=releases.current,
        options=("--ready", "pipe", "--listen-fds", "4"),
    )
    with Load(m.port, duration=40) as load:
        load.wait_requests(200)
        for name in ("r2", "r3", "r4"):
            # From r2 on, every worker warms V8 up before it listens (see the app).
            releases.make(name, WARMUP="500")
            releases.switch(name)
            before = load.result.ok
            r = m.cli("reload", "--wait")
            assert r.returncode == 0, r.stderr + m.log_text()
            load.wait_requests(before + 200)
        assert_no_failures(load)
    assert releases_of(m) == {"r4"} and load.result.bodies["r4"] > 0
    assert len(re.findall(r"warmed up with \d+ requests", m.log_text())) >= 6, m.log_text()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(30)
def test_idle_master_sleeps(masters: Masters) -> None:
    m = masters.start()
    assert m.request({"cmd": "reload"}, timeout=20)[-1]["ok"]
    before = cpu_seconds(m.pid)
    time.sleep(2)
    assert cpu_seconds(m.pid) - before < 0.1


# --- under systemd: socket activation and sd_notify for the master itself ---


@pytest.mark.timeout(60)
def test_systemd_socket_activation_and_notify_reload(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    sock, log = tmp_path / "m.sock", tmp_path / "m.log"
    # What systemd does: the socket on fd 3, LISTEN_PID = the pid that runs the master.
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid());"
        " os.execv(sys.executable, [sys.executable, '-m', 'deployer.master', *sys.argv[2:]])"
    )
    argv = [PYTHON, "-c", launcher, str(listener.fileno()), "run", "--workers", "2",
            "--socket", str(sock), "--log", str(log), "--ready-soak", "0.2",
            "--", PYTHON, str(PYTHON_APP)]  # fmt: skip
    env = {**os.environ, "LISTEN_FDS": "1", "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, pass_fds=(listener.fileno(),))
    listener.close()  # the master holds it now: no --listen, it binds nothing
    m = Master(proc, sock, port, log)
    try:

        def notification(key: str) -> dict[str, str]:
            while True:
                fields = dict(
                    line.split("=", 1) for line in notify.recv(4096).decode().splitlines()
                )
                if key in fields:
                    return fields

        ready = notification("READY")
        assert ready["MAINPID"] == str(proc.pid) and "2 workers ready" in ready["STATUS"]
        assert m.get("/")[0] == 200
        assert m.status()["listen"] == f"127.0.0.1:{port}"
        assert m.cli("reload", "--wait").returncode == 0
        assert "MONOTONIC_USEC" in notification("RELOADING")
        assert notification("READY")["STATUS"].startswith("reload 1 ok")
        assert m.cli("upgrade").returncode == 0
        assert notification("READY")["STATUS"] == "upgrade ok"
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING" in notification("STOPPING")
        assert m.wait_exit(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def listen_backlog(port: int) -> int:
    """Send-Q of a listening socket in `ss -ltn` is its backlog."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
    return int(out.stdout.split()[2])


@pytest.mark.timeout(60)
def test_a_worker_shrinking_the_shared_backlog_is_put_back(masters: Masters) -> None:
    # Like Node (511), asyncio (100) or gunicorn (2048): listen() again on fd 3.
    shrinker = (
        "import os, socket, time; s = socket.socket(fileno=3); s.listen(7);"
        " d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM);"
        " a = os.environ['NOTIFY_SOCKET']; d.sendto(b'READY=1', '\\0' + a[1:]);"
        " time.sleep(600)"
    )
    m = masters.start(command=[PYTHON, "-c", shrinker], workers=1)
    wait_for(lambda: listen_backlog(m.port) > 7, 5, "the backlog to be put back")
    deep = listen_backlog(m.port)
    assert deep >= 128, deep
    assert "set the listen backlog to 7; put back to" in m.log_text()
    m.cli("reload", "--wait")
    assert listen_backlog(m.port) == deep
    # The example apps ask for the deepest queue themselves.
    for app in (PYTHON_APP, NODE_APP):
        command = [PYTHON, str(app)] if app == PYTHON_APP else ["node", str(app)]
        options = ("--ready", "pipe") if app == NODE_APP else ()
        e = masters.start(command=command, workers=1, options=options)
        assert listen_backlog(e.port) == deep
        assert "listen backlog" not in e.log_text()
