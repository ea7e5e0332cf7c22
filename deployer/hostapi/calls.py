"""Agent calls as data: the argv the controller sends and the answer it expects.

`python3 <deploy_to>/.deployer/deployer.pyz agent OP --root <deploy_to> ARGS`;
the agent's parser (deployer/agent/cli.py) reads exactly these, which the
unit tests check by parsing every call built here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from deployer.hostapi import answers
from deployer.hostapi.layout import Layout

LOCK_ACTIONS = ("acquire", "release", "heartbeat", "show")


class AgentCall(NamedTuple):
    op: str
    args: tuple[str, ...]
    answer: type[tuple]
    root: bool = True  # the op works on a deploy root (--root)

    def argv(self, python: str, layout: Layout) -> list[str]:
        root = ("--root", str(layout.root)) if self.root else ()
        return [python, str(layout.pyz), "agent", self.op, *root, *self.args]


def version() -> AgentCall:
    return AgentCall("version", (), answers.Version, root=False)


def setup() -> AgentCall:
    return AgentCall("setup", (), answers.SetupResult)


def state() -> AgentCall:
    return AgentCall("state", (), answers.HostState)


def prepare(
    revision: str,
    release: str,
    shared: Sequence[str] = (),
    build: str | None = None,
    receive: bool = False,
) -> AgentCall:
    """`receive`: a pack on stdin is indexed into repo/ first, in the same call."""
    args = ["--revision", revision, "--release", release]
    args += [a for path in shared for a in ("--shared", path)]
    if build:
        args += ["--build", build]
    if receive:
        args.append("--receive")
    return AgentCall("prepare", tuple(args), answers.PrepareResult)


def switch(release: str) -> AgentCall:
    return AgentCall("switch", ("--release", release), answers.SwitchResult)


def prune(keep: int) -> AgentCall:
    return AgentCall("prune", ("--keep", str(keep)), answers.PruneResult)


def health(url: str, expect: int, timeout: float, passes: int, interval: float) -> AgentCall:
    args = ("--url", url, "--expect", str(expect), "--timeout", str(timeout))
    args += ("--passes", str(passes), "--interval", str(interval))
    return AgentCall("health", args, answers.HealthResult, root=False)


def record(entry: dict[str, Any]) -> AgentCall:
    return AgentCall("record", ("--entry", json.dumps(entry, sort_keys=True)), answers.Recorded)


def lock(action: str, owner: answers.LockOwner, force: bool = False) -> AgentCall:
    """`force`: release whoever holds it (unlock of a stale lock)."""
    if action not in LOCK_ACTIONS:
        raise ValueError(f"unknown lock action {action!r}")
    args = (action, "--owner", json.dumps(owner.to_json(), sort_keys=True))
    return AgentCall("lock", args + (("--force",) if force else ()), answers.LockAnswer)


def zipapp(python: str, layout: Layout, *words: str) -> list[str]:
    """Any other command of the host's zipapp: `master ...`, `migrate ...`."""
    return [python, str(layout.pyz), *words]


def master_start(layout: Layout) -> tuple[str, ...]:
    return ("master", "start", "--config", str(layout.master_config))


def master_reload(socket: str, timeout: float) -> tuple[str, ...]:
    return ("master", "reload", "--socket", socket, "--wait", "--timeout", str(timeout))


def master_upgrade(socket: str) -> tuple[str, ...]:
    return ("master", "upgrade", "--socket", socket)


def master_stop(socket: str) -> tuple[str, ...]:
    return ("master", "stop", "--socket", socket)
