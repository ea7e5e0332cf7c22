"""Migrations from the controller's side: which host runs them, the phases of a
rollout, and what a rollback must know about them.

The runner itself is host-side (`deployer/migrations/`); here it is driven over
the migrations host's transport, so the database never needs to be reachable
from the controller.
"""

from __future__ import annotations

from collections.abc import Callable

from deployer.errors import BadInput
from deployer.hostapi import calls
from deployer.hostapi.answers import MigrationRow, migration_rows
from deployer.remote import RemoteHost
from deployer.session import FleetSession


def migrations_host(fleet: FleetSession, needs_release: bool = True) -> RemoteHost | None:
    """The host that runs migrations. A rollout needs it among the selected hosts
    (it must have the new release); reading state or going down does not."""
    m = fleet.inventory.migrations
    if m is None:
        return None
    name = m.host or next(iter(fleet.remotes))
    if name not in fleet.remotes and not needs_release:
        return fleet.remote(name)
    if name not in fleet.remotes:
        raise BadInput(
            f"[migrations] host {name!r} is not among the selected hosts "
            f"({', '.join(fleet.remotes)}): it needs the new release to run migrations"
        )
    return fleet.remotes[name]


def _dir(remote: RemoteHost, release: str, subdir: str) -> str:
    layout = remote.layout
    base = layout.current if release == "current" else layout.release(release)
    return str(base / subdir)


def run_migrations(fleet: FleetSession, phase: str, release: str, deferred: bool = False) -> None:
    """One phase of migrations on the migrations host, from `release`'s files.

    `deferred`: contract = "next-rollout" runs the contract migrations the running
    release shipped, at the start of the next rollout (before its expand); the new
    release's own contract migrations must not run then, hence current's files.
    """
    m = fleet.inventory.migrations
    remote = migrations_host(fleet)
    if m is None or remote is None:
        return
    if deferred and m.contract != "next-rollout":
        return
    if phase == "contract" and not deferred and m.contract == "next-rollout":
        fleet.reporter.say("contract migrations deferred to the next rollout")
        return
    files = _dir(remote, release, m.dir)
    fleet.reporter.say(f"migrations: {phase}{' (deferred)' if deferred else ''} from {files}")
    # deferred: the running release may predate migrations (or be a first deploy)
    words = calls.migrate_up(phase, files, None if release == "current" else release, deferred)
    remote.migrate(
        words,
        database=m.database,
        cwd=str(remote.layout.shared),  # sqlite:///relative paths live in shared/
        on_line=lambda s: fleet.reporter.say(f"migrate: {s}", remote.name),
    )


def dialect(database: str) -> str:
    """The SQL dialect lint checks for a [migrations] database URL."""
    return "postgresql" if database.startswith("postgres") else "sqlite"


def on_host(
    fleet: FleetSession, args: list[str], on_line: Callable[[str], None]
) -> tuple[int, str]:
    """`deployer migrate status|up|down|accept ARGS` run on the migrations host
    against its current release's files; (exit code, stderr)."""
    m = fleet.inventory.migrations
    remote = migrations_host(fleet, needs_release=False)
    assert m is not None and remote is not None
    # ours first: an explicit --dir of the operator's comes later and wins
    where = ("--dir", _dir(remote, "current", m.dir))
    result = remote.migrate(
        calls.migrate(args[0], *where, *args[1:]),
        database=m.database,
        cwd=str(remote.layout.shared),
        on_line=on_line,
        check=False,
    )
    return result.exit_code, result.stderr


def applied(fleet: FleetSession) -> list[MigrationRow]:
    """Applied migrations with phase and the release that applied them."""
    m = fleet.inventory.migrations
    remote = migrations_host(fleet, needs_release=False)
    if m is None or remote is None:
        return []
    result = remote.migrate(
        calls.migrate_status(_dir(remote, "current", m.dir)),
        database=m.database,
        cwd=str(remote.layout.shared),
    )
    return [r for r in migration_rows(result.stdout) if r.applied]


def check_rollback(rows: list[MigrationRow], target: str, force: bool) -> list[str]:
    """Refuse going back past a release whose contract migrations ran; returns the
    names of migrations applied by releases newer than `target` (which it leaves)."""
    newer = [r for r in rows if (r.release or "") > target]
    contract = [r for r in newer if r.phase == "contract"]
    if contract and not force:
        oldest_safe = max(r.release or "" for r in contract)
        names = ", ".join(r.name for r in contract)
        raise BadInput(
            f"rollback to {target} refused: contract migrations {names} already ran "
            f"(shipped by {oldest_safe}); the code of {target} may not work with that "
            f"schema. The oldest safe release is {oldest_safe}; --force goes anyway."
        )
    return [f"{r.name} ({r.phase}, release {r.release})" for r in newer]


def down_expand(fleet: FleetSession, releases: list[str]) -> None:
    """`rollback --migrations`: the down sections of the expand migrations the left
    releases applied, newest release first, from each release's own files."""
    m = fleet.inventory.migrations
    remote = migrations_host(fleet, needs_release=False)
    if m is None or remote is None:
        return
    for release in sorted(set(releases), reverse=True):
        fleet.reporter.say(f"migrations: down (expand) applied by {release}")
        remote.migrate(
            calls.migrate_down(release, "expand", _dir(remote, release, m.dir)),
            database=m.database,
            cwd=str(remote.layout.shared),
            on_line=lambda s: fleet.reporter.say(f"migrate: {s}", remote.name),
        )
