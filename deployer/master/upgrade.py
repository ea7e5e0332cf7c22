"""Self-upgrade: the master re-execs itself in place (einhorn style).

Same pid, so systemd's MAINPID, the pidfile and the workers' parent stay the
same; the listening socket, the workers, their pipes, the control socket and
its clients (the one that asked gets its answer from the new master) are all
kept. The state (Arbiter.to_state) goes to the new master as JSON in a memfd
it inherits.

1. preflight: the new code runs `_resume --check` on the state (import,
   parse, adopt as a dry run); any failure and nothing else happens.
2. signals are blocked (they stay pending across exec, nothing can kill us
   by default action in between), the fds are made inheritable, exec.
3. the new master adopts the state (Arbiter.from_state). If it cannot, it
   execs the previous code with the same state, which adopts it and reports
   the failure.

The old master's side is the arbiter's `upgrade` command (handlers.py) on the
mechanics in reexec.py; this module is the new master's side.
"""

from __future__ import annotations

from typing import Any

from deployer.master import reexec
from deployer.master.arbiter import Arbiter
from deployer.master.daemon import remove_pidfile


class AdoptError(Exception):
    """The state cannot be adopted by this code."""


def restore(state: dict[str, Any], dry_run: bool = False) -> Arbiter:
    """The arbiter the state describes; dry_run touches no fd (preflight)."""
    version = state.get("version")
    if version not in reexec.READABLE_VERSIONS:
        readable = " and ".join(map(str, reexec.READABLE_VERSIONS))
        raise AdoptError(f"state version {version} (this code reads {readable})")
    arb = Arbiter.from_state(state, dry_run=dry_run)
    if not dry_run:
        reexec.settle(state)
    return arb


def exec_back(state: dict[str, Any], error: str) -> None:
    """The new code could not adopt the state: go back to the previous code
    (state["code"]["next"] still names the one that failed, for the answer)."""
    state["adopt_error"] = error
    code = state["code"]["previous"]
    e = reexec.reexec(state, code)
    raise SystemExit(f"deployer master: cannot exec back to {code}: {e}")


def resume(fd: int, check: bool) -> int:
    """`_resume`: the entry point of a re-exec'd master (and of the preflight)."""
    state = reexec.read_state(fd)
    if check:
        restore(state, dry_run=True)
        return 0
    try:
        arb = restore(state)
    except Exception as e:  # noqa: BLE001 - any failure to adopt means: go back
        if state["adopt_error"] is not None:
            raise  # already the fallback: nothing further to go back to
        exec_back(state, f"{type(e).__name__}: {e}")
        return 1  # pragma: no cover
    try:
        return arb.run(resumed=state)
    finally:
        remove_pidfile(arb.cfg.pidfile)
