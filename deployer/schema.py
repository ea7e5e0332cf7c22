"""Migrations from the controller's side: which host runs them, the phases of a
rollout, and what a rollback must know about them.

The runner itself is host-side (`deployer/migrations/`); here it is driven over
the migrations host's transport, so the database never needs to be reachable
from the controller.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deployer.errors import BadInput
from deployer.remote import RemoteHost

if TYPE_CHECKING:
    from deployer.rollout import Deploy


def migrations_host(deploy: Deploy, needs_release: bool = True) -> RemoteHost | None:
    """The host that runs migrations. A rollout needs it among the selected hosts
    (it must have the new release); reading state or going down does not."""
    m = deploy.inventory.migrations
    if m is None:
        return None
    name = m.host or next(iter(deploy.remotes))
    if name not in deploy.remotes and not needs_release:
        return deploy.remote(name)
    if name not in deploy.remotes:
        raise BadInput(
            f"[migrations] host {name!r} is not among the selected hosts "
            f"({', '.join(deploy.remotes)}): it needs the new release to run migrations"
        )
    return deploy.remotes[name]


def _dir(remote: RemoteHost, release: str, subdir: str) -> str:
    base = f"{remote.root}/current" if release == "current" else f"{remote.root}/releases/{release}"
    return f"{base}/{subdir}"


def run_migrations(deploy: Deploy, phase: str, release: str, deferred: bool = False) -> None:
    """One phase of migrations on the migrations host, from `release`'s files.

    `deferred`: contract = "next-rollout" runs the contract migrations the running
    release shipped, at the start of the next rollout (before its expand); the new
    release's own contract migrations must not run then, hence current's files.
    """
    m = deploy.inventory.migrations
    remote = migrations_host(deploy)
    if m is None or remote is None:
        return
    if deferred and m.contract != "next-rollout":
        return
    if phase == "contract" and not deferred and m.contract == "next-rollout":
        deploy.reporter.say("contract migrations deferred to the next rollout")
        return
    files = _dir(remote, release, m.dir)
    deploy.reporter.say(f"migrations: {phase}{' (deferred)' if deferred else ''} from {files}")
    args = ["up", "--phase", phase, "--dir", files, "--database", m.database]
    if release != "current":
        args += ["--release", release]
    remote.migrate(
        *args,
        cwd=f"{remote.root}/shared",  # sqlite:///relative paths live in shared/
        on_line=lambda s: deploy.reporter.say(f"migrate: {s}", remote.name),
    )


REMOTE_COMMANDS = ("status", "up", "down", "accept")


def on_host(deploy: Deploy, args: list[str], on_line: Callable[[str], None]) -> tuple[int, str]:
    """`deployer migrate status|up|down|accept ARGS` run on the migrations host
    against its current release's files; (exit code, stderr)."""
    m = deploy.inventory.migrations
    remote = migrations_host(deploy, needs_release=False)
    assert m is not None and remote is not None
    # ours first: an explicit --dir/--database of the operator's comes later and wins
    where = ["--dir", _dir(remote, "current", m.dir), "--database", m.database]
    result = remote.migrate(
        args[0], *where, *args[1:], cwd=f"{remote.root}/shared", on_line=on_line, check=False
    )
    return result.exit_code, result.stderr


def applied(deploy: Deploy) -> list[dict[str, Any]]:
    """Applied migrations with phase and the release that applied them."""
    m = deploy.inventory.migrations
    remote = migrations_host(deploy, needs_release=False)
    if m is None or remote is None:
        return []
    result = remote.migrate(
        "status",
        "--json",
        "--dir",
        _dir(remote, "current", m.dir),
        "--database",
        m.database,
        cwd=f"{remote.root}/shared",
    )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    # "missing"/"changed": applied, by a release whose files current no longer has
    done = ("applied", "missing", "changed")
    return [r for r in rows if r.get("event") == "migration" and r.get("state") in done]


def check_rollback(rows: list[dict[str, Any]], target: str, force: bool) -> list[str]:
    """Refuse going back past a release whose contract migrations ran; returns the
    names of migrations applied by releases newer than `target` (which it leaves)."""
    newer = [r for r in rows if (r.get("release") or "") > target]
    contract = [r for r in newer if r.get("phase") == "contract"]
    if contract and not force:
        oldest_safe = max(r["release"] for r in contract)
        names = ", ".join(r["name"] for r in contract)
        raise BadInput(
            f"rollback to {target} refused: contract migrations {names} already ran "
            f"(shipped by {oldest_safe}); the code of {target} may not work with that "
            f"schema. The oldest safe release is {oldest_safe}; --force goes anyway."
        )
    return [f"{r['name']} ({r['phase']}, release {r['release']})" for r in newer]


def down_expand(deploy: Deploy, releases: list[str]) -> None:
    """`rollback --migrations`: the down sections of the expand migrations the left
    releases applied, newest release first, from each release's own files."""
    m = deploy.inventory.migrations
    remote = migrations_host(deploy, needs_release=False)
    if m is None or remote is None:
        return
    for release in sorted(set(releases), reverse=True):
        deploy.reporter.say(f"migrations: down (expand) applied by {release}")
        remote.migrate(
            "down",
            "--release",
            release,
            "--phase",
            "expand",
            "--dir",
            _dir(remote, release, m.dir),
            "--database",
            m.database,
            cwd=f"{remote.root}/shared",
            on_line=lambda s: deploy.reporter.say(f"migrate: {s}", remote.name),
        )
