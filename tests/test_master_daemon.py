"""`deployer master start`: daemon mode, pidfile, start failures, a master
killed with SIGKILL, the log (prefixes, SIGUSR1 reopen)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from master_helpers import (
    PYTHON,
    PYTHON_APP,
    control,
    free_port,
    master_cli,
    pid_alive,
    wait_for,
)


@dataclass
class Daemons:
    tmp: Path
    pids: set[int] = field(default_factory=set)

    def start(self, *options: str, env_prefix: tuple[str, ...] = (), name: str = "d"):
        port = free_port()
        sock, pidfile, log = (self.tmp / f"{name}.{ext}" for ext in ("sock", "pid", "log"))
        argv = ["start", "--workers", "2", "--listen", f"127.0.0.1:{port}", "--socket", str(sock),
                "--pidfile", str(pidfile), "--log", str(log), "--ready-soak", "0.2", *options,
                "--", *env_prefix, PYTHON, str(PYTHON_APP)]  # fmt: skip
        r = master_cli(*argv, timeout=60)
        if pidfile.exists():
            self.pids.add(int(pidfile.read_text()))
        return r, port, sock, pidfile, log

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


def get(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.makefile("rb").read().decode()


def port_free(port: int) -> bool:
    """Bindable the way a new master binds (SO_REUSEADDR: TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.timeout(60)
def test_start_returns_when_ready_then_stop(daemons: Daemons) -> None:
    r, port, sock, pidfile, _ = daemons.start()
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    assert r.stdout.startswith(f"master pid {pid}: 2 workers ready on 127.0.0.1:{port}")
    assert "200 OK" in get(port)  # ready means serving, no waiting needed
    status = control(sock, {"cmd": "status"})[-1]["status"]
    assert status["pid"] == pid and status["ready"] == 2
    assert os.getsid(pid) != os.getsid(0)  # detached from our session (and terminal)
    again = daemons.start(name="d")
    assert again[0].returncode == 2 and "another master is already running" in again[0].stderr
    stop = master_cli("stop", "--socket", str(sock))
    assert stop.returncode == 0, stop.stderr
    wait_for(lambda: not pid_alive(pid), 10, "the daemon to exit")
    assert not pidfile.exists() and not sock.exists()
    assert port_free(port)


@pytest.mark.timeout(60)
def test_start_exits_1_when_workers_never_get_ready(daemons: Daemons) -> None:
    r, port, sock, pidfile, log = daemons.start(env_prefix=("env", "CRASH_AT_BOOT=1"))
    assert r.returncode == 1
    assert "start failed: worker" in r.stderr
    assert "exited with code 3 before it was ready" in r.stderr
    assert "CRASH_AT_BOOT set: failing on purpose" in r.stderr
    wait_for(lambda: not sock.exists(), 5, "the failed daemon to clean up")
    assert port_free(port)


@pytest.mark.timeout(60)
def test_daemon_killed_with_sigkill_leaves_no_workers_and_start_works_again(
    daemons: Daemons,
) -> None:
    r, port, sock, pidfile, _ = daemons.start()
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    workers = [w["pid"] for w in control(sock, {"cmd": "status"})[-1]["status"]["workers"]]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in workers), 2, "workers to die within 2 s")
    wait_for(lambda: port_free(port), 2, "the port to be free")
    # Stale pidfile and socket file are left behind; a new start replaces them.
    assert pidfile.exists() and sock.exists()
    r2 = daemons.start()
    assert r2[0].returncode == 0, r2[0].stderr
    assert "200 OK" in get(r2[1])


@pytest.mark.timeout(60)
def test_log_prefixes_and_sigusr1_reopen(daemons: Daemons) -> None:
    r, port, sock, pidfile, log = daemons.start()
    assert r.returncode == 0
    pid = int(pidfile.read_text())
    text = log.read_text()
    workers = control(sock, {"cmd": "status"})[-1]["status"]["workers"]
    for w in workers:  # the app's own stdout line, prefixed with worker id and pid
        assert f"[worker {w['id']} pid {w['pid']}] pid {w['pid']} serving release" in text
    assert f"[master {pid}] 2 workers ready" in text
    rotated = log.with_suffix(".log.1")
    log.rename(rotated)
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: log.exists() and "log reopened" in log.read_text(), 5, "reopen")
    assert control(sock, {"cmd": "reload"}, timeout=30)[-1]["ok"]
    new = log.read_text()
    assert "serving release" in new and "reload 1 done" in new
    assert "reload 1 done" not in rotated.read_text()


@pytest.mark.timeout(60)
def test_upgrade_of_a_daemon_keeps_pidfile_and_stop_still_cleans_up(daemons: Daemons) -> None:
    r, port, sock, pidfile, log = daemons.start()
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    workers = sorted(w["pid"] for w in control(sock, {"cmd": "status"})[-1]["status"]["workers"])
    up = master_cli("upgrade", "--socket", str(sock))
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"master pid {pid} upgraded in place" in up.stdout
    status = control(sock, {"cmd": "status"})[-1]["status"]
    assert status["pid"] == pid and status["upgrades"] == 1
    assert sorted(w["pid"] for w in status["workers"]) == workers
    assert int(pidfile.read_text()) == pid and "200 OK" in get(port)
    stop = master_cli("stop", "--socket", str(sock))
    assert stop.returncode == 0, stop.stderr
    wait_for(lambda: not pid_alive(pid), 10, "the daemon to exit")
    assert not pidfile.exists() and not sock.exists()
    assert not any(pid_alive(w) for w in workers)
    assert "upgraded in place" in log.read_text()
