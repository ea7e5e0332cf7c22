"""`[master] nonblocking`: a worker that polls then accepts (Python's socketserver)
drains at once instead of hanging in accept() until shutdown_timeout.

Workers share one listening socket: a connection wakes every worker's poll, one
accepts it, the others block in accept() -- where Python retries after SIGTERM.
The test waits until a worker really is blocked in accept() (its main thread's
syscall, from /proc), then reloads."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest
from master_helpers import PYTHON, REPO, Master, Masters, wait_for

APP = REPO / "examples" / "socketserver-app" / "app.py"
ACCEPT = {"x86_64": {"43", "288"}, "aarch64": {"202", "242"}}[platform.machine()]
SHUTDOWN_TIMEOUT = 8


def in_accept(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] in ACCEPT
    except (OSError, IndexError):
        return False


def blocked_worker(master: Master, tries: int = 200) -> int | None:
    """Requests one at a time until a worker sits blocked in accept() (None: never)."""
    for _ in range(tries):
        assert master.get()[0] == 200
        pids = [w["pid"] for w in master.status()["workers"]]

        def blocked(pids: list[int] = pids) -> int | None:
            return next((p for p in pids if in_accept(p)), None)

        try:
            return wait_for(blocked, 0.3, "a worker in accept")
        except AssertionError:
            continue
    return None


def reload(master: Master) -> float:
    started = time.monotonic()
    r = master.cli("reload", "--wait", timeout=SHUTDOWN_TIMEOUT + 30)
    assert r.returncode == 0, r.stdout + r.stderr
    return time.monotonic() - started


def test_a_blocking_socket_hangs_the_drain_until_shutdown_timeout(masters: Masters) -> None:
    options = ("--shutdown-timeout", str(SHUTDOWN_TIMEOUT))
    master = masters.start([PYTHON, str(APP)], workers=2, options=options)
    pid = blocked_worker(master)
    assert pid is not None, "no worker ever blocked in accept(): the test proves nothing"
    took = reload(master)
    wait_for(lambda: "still alive after shutdown_timeout: SIGKILL" in master.log_text(), 30, "kill")
    print(f"reload with a blocking socket: {took:.2f}s")
    assert took >= SHUTDOWN_TIMEOUT - 1, took


@pytest.mark.parametrize("how", ["flag", "config"])
def test_nonblocking_drains_at_once(masters: Masters, tmp_path: Path, how: str) -> None:
    options: tuple[str, ...] = ("--shutdown-timeout", str(SHUTDOWN_TIMEOUT))
    if how == "flag":
        options += ("--nonblocking", "true")
    else:
        config = tmp_path / "master.toml"
        config.write_text("[master]\nnonblocking = true\n")
        options += ("--config", str(config))
    master = masters.start([PYTHON, str(APP)], workers=2, options=options)
    old = {w["pid"] for w in master.status()["workers"]}
    assert blocked_worker(master, tries=30) is None  # accept() never blocks now
    took = reload(master)
    assert "SIGKILL" not in master.log_text()
    assert {w["pid"] for w in master.status()["workers"]}.isdisjoint(old)
    assert all(not os.path.exists(f"/proc/{p}") or in_accept(p) is False for p in old)
    print(f"reload with nonblocking ({how}): {took:.2f}s")
    assert took < SHUTDOWN_TIMEOUT / 2, took
