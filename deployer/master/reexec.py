"""The mechanics of a self-upgrade (see upgrade.py for the whole protocol):
the state's envelope, the preflight check, and the exec with the state in a
memfd the new master inherits.

Nothing here knows the arbiter: the old master's arbiter calls these with
the state it gives (Arbiter.to_state), and the new master's entry point
(upgrade.resume) reads it back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import deployer
from deployer.master.worker import CAUGHT_SIGNALS

STATE_VERSION = 1
# The state of a master without a listening socket: code before that mode would
# adopt it wrongly (it would wrap a missing fd as a new, unbound socket and give
# it to the workers as fd 3), so its preflight refuses it by the version.
SOCKETLESS_STATE_VERSION = 2
READABLE_VERSIONS = (STATE_VERSION, SOCKETLESS_STATE_VERSION)
CHECK_TIMEOUT = 30.0


def code_root() -> str:
    """Directory (or zipapp) that holds the `deployer` package we run from. A master
    started through the zipapp's bootstrap runs from its memfd copy: named through
    our pid, so that the preflight child can read it too."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(deployer.__file__)))
    if root.startswith("/proc/self/"):
        root = f"/proc/{os.getpid()}/" + root[len("/proc/self/") :]
    return root


def new_state(arbiter_state: dict[str, Any], code: str) -> dict[str, Any]:
    """The arbiter's state in the envelope the next master reads."""
    socketless = arbiter_state["fds"]["listener"] is None
    return {
        "version": SOCKETLESS_STATE_VERSION if socketless else STATE_VERSION,
        **arbiter_state,
        "code": {"previous": code_root(), "next": code},
        "pythonpath": os.environ.get("PYTHONPATH"),
        # Masters of earlier code read this key (it was a test switch there):
        # it stays, always False, so they can adopt this state. Ignored here.
        "simulate_adopt_failure": False,
        "adopt_error": None,
        "saved_at": time.monotonic(),  # CLOCK_MONOTONIC is system-wide: deadlines stay valid
    }


def state_fds(state: dict[str, Any]) -> list[int]:
    """Every fd the state names: they must survive the exec."""
    fds = [fd for fd in state["fds"].values() if fd is not None]
    fds += [s["fd"] for s in state["streams"]]
    fds += [w["ready_fd"] for w in state["workers"] if w["ready_fd"] is not None]
    fds += [c["fd"] for c in state["conns"]]
    return fds


def resume_command(
    state: dict[str, Any], code: str, *args: str
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of `_resume` on `code`.

    The master's cwd is kept off sys.path, so `code` (first on PYTHONPATH) is
    what gets imported even if the cwd holds another deployer package: `-P`,
    or before Python 3.11 (no -P) a `-c` that drops it.
    """
    env = dict(os.environ, PYTHONPATH=pythonpath(code, state["pythonpath"]))
    if sys.version_info >= (3, 11):  # noqa: UP036 - the host side runs on 3.9 too
        return [sys.executable, "-P", "-m", "deployer.master", "_resume", *args], env
    return [sys.executable, "-c", RUN_WITHOUT_CWD, "_resume", *args], env


RUN_WITHOUT_CWD = (
    "import runpy, sys; del sys.path[0]; runpy.run_module('deployer.master', run_name='__main__')"
)


def pythonpath(code: str, original: str | None) -> str:
    return code if not original else f"{code}{os.pathsep}{original}"


def preflight(state: dict[str, Any], code: str) -> str | None:
    """Run the new code's adoption check on the state; None if it passes."""
    argv, env = resume_command(state, code, "--check", "--state-fd", "0")
    try:
        r = subprocess.run(
            argv,
            input=json.dumps(state),
            capture_output=True,
            text=True,
            env=env,
            timeout=CHECK_TIMEOUT,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the check did not run: {e}"
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return f"exit {r.returncode}: " + " | ".join(lines[-5:])
    return None


def reexec(state: dict[str, Any], code: str) -> OSError:
    """exec the master on `code` with `state`; returns only if exec failed."""
    signal.pthread_sigmask(signal.SIG_BLOCK, CAUGHT_SIGNALS)
    fds = state_fds(state)
    for fd in fds:
        os.set_inheritable(fd, True)
    memfd = os.memfd_create("deployer-master-state", 0)
    os.write(memfd, json.dumps(state).encode())
    os.lseek(memfd, 0, os.SEEK_SET)
    os.set_inheritable(memfd, True)
    argv, env = resume_command(state, code, "--state-fd", str(memfd))
    signal.set_wakeup_fd(-1)
    try:
        os.execve(sys.executable, argv, env)
    except OSError as e:
        os.close(memfd)
        for fd in fds:
            os.set_inheritable(fd, False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT_SIGNALS)
        return e
    raise AssertionError("unreachable")  # pragma: no cover


def read_state(fd: int) -> dict[str, Any]:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    if fd > 2:
        os.close(fd)
    return json.loads(b"".join(chunks))


def settle(state: dict[str, Any]) -> None:
    """The new master adopted the state: its fds and environment are its own again."""
    for fd in state_fds(state):
        os.set_inheritable(fd, False)
    if state["pythonpath"] is None:
        os.environ.pop("PYTHONPATH", None)  # ours, for the exec; workers must not see it
    else:
        os.environ["PYTHONPATH"] = state["pythonpath"]
