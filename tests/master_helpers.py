"""Helpers for the master tests: real masters, real release directories,
and a bounded keep-alive HTTP load generator.

Every master started here is killed by pid at the end of its test (SIGKILL,
after which its workers die with it: PR_SET_PDEATHSIG), and every load
generator stops by itself after its duration.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the package's own bounded load generator (deployer demo uses it too)
from deployer.loadgen import Load  # noqa: F401 - re-exported for the tests

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PYTHON_APP = REPO / "examples" / "python-app" / "app.py"
NODE_APP = REPO / "examples" / "node-app" / "app.js"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def master_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "deployer.master", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def control(path: str | Path, message: dict[str, Any], timeout: float = 10) -> list[dict[str, Any]]:
    """Raw control-socket exchange: every answer line until the one with "ok"."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((json.dumps(message) + "\n").encode())
        answers: list[dict[str, Any]] = []
        buffer = b""
        while not answers or "ok" not in answers[-1]:
            data = s.recv(65536)
            if not data:
                break
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            answers += [json.loads(line) for line in lines if line.strip()]
        return answers


# --- release directories (what a deploy leaves on a host) ---


@dataclass
class Releases:
    """<root>/releases/<name>/ with the app, and <root>/current -> one of them."""

    root: Path
    app: Path = PYTHON_APP

    @property
    def current(self) -> Path:
        return self.root / "current"

    def make(self, name: str, **env: str) -> Path:
        path = self.root / "releases" / name
        path.mkdir(parents=True, exist_ok=True)
        link = path / self.app.name
        if not link.exists():
            link.symlink_to(self.app)
        (path / "release.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        return path

    def switch(self, name: str) -> None:
        """Atomically repoint `current` (rename over it), like a deploy does."""
        tmp = self.root / f".current.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.root / "releases" / name)
        tmp.rename(self.current)


# --- masters ---


@dataclass
class Master:
    proc: subprocess.Popen[bytes]
    socket: Path
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, message: dict[str, Any], timeout: float = 10) -> list[dict[str, Any]]:
        return control(self.socket, message, timeout)

    def status(self) -> dict[str, Any]:
        return self.request({"cmd": "status"})[-1]["status"]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return master_cli(*args, "--socket", str(self.socket), timeout=timeout)

    def ready_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.status()["workers"] if w["state"] == "ready"]

    def worker_pids(self) -> set[int]:
        return {w["pid"] for w in self.status()["workers"]}

    def wait_ready(self, n: int, timeout: float = 15) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            if not self.socket.exists():
                return None
            try:
                s = self.status()
            except OSError:
                return None
            ready = [w for w in s["workers"] if w["state"] == "ready"]
            settled = len(ready) == n == len(s["workers"]) and s["state"] == "running"
            return ready if settled else None

        return wait_for(check, timeout, f"{n} ready workers; log:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"

    def get(self, path: str = "/", timeout: float = 10) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@dataclass
class Masters:
    """Starts masters for one test and kills whatever is left at the end."""

    tmp: Path
    started: list[Master] = field(default_factory=list)
    worker_pids: set[int] = field(default_factory=set)

    def start(
        self,
        command: list[str] | None = None,
        workers: int = 2,
        cwd: Path | None = None,
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
        sock: Path | None = None,
    ) -> Master:
        n = len(self.started)
        port = free_port()
        sock = sock or self.tmp / f"m{n}.sock"
        log = self.tmp / f"m{n}.log"
        argv = [PYTHON, "-m", "deployer.master", "run", "--workers", str(workers),
                "--listen", f"127.0.0.1:{port}", "--socket", str(sock), "--log", str(log),
                "--ready-soak", "0.2", "--shutdown-timeout", "10", *options]  # fmt: skip
        if cwd is not None:
            argv += ["--cwd", str(cwd)]
        argv += ["--", *(command or [PYTHON, PYTHON_APP.name if cwd else str(PYTHON_APP)])]
        proc = subprocess.Popen(
            argv, cwd=REPO, env={**os.environ, "IDLE_TIMEOUT": "2", **(env or {})}
        )
        master = Master(proc, sock, port, log)
        self.started.append(master)
        if wait:
            for w in master.wait_ready(workers):
                self.worker_pids.add(w["pid"])
        return master

    def remember_workers(self, master: Master) -> None:
        with contextlib.suppress(OSError, KeyError, IndexError):
            self.worker_pids.update(w["pid"] for w in master.status()["workers"])

    def cleanup(self) -> None:
        for m in self.started:
            if m.proc.poll() is None:
                self.remember_workers(m)
                m.proc.kill()
                m.proc.wait(timeout=10)
        for pid in self.worker_pids:  # belt and braces: PDEATHSIG should have done it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def releases_of(master: Master) -> set[str]:
    """The release directory names the master's workers run."""
    return {os.path.basename(w["release"]) for w in master.status()["workers"]}


def serves(port: int, address: str = "127.0.0.1") -> bool:
    """An HTTP GET / on `port` answers 200 (a fresh connection, closed after)."""
    with contextlib.suppress(OSError), socket.create_connection((address, port), 2) as s:
        s.settimeout(2)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(64).startswith(b"HTTP/1.1 200")
    return False
