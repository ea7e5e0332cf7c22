"""The app's lifecycle on its hosts, beside rollout and rollback: what an operator
reaches for in Kamal (`app boot`, `app stop`, `app start`, `remove`) or pm2
(`reload`, `stop`, `scale`, `delete`).

- reload (restart): every role's master replaces its workers one by one from the
  release `current` names (a new environment, secrets, a stuck worker), through the
  rollout's own path: batch by batch, canary first, health checked and watched.
- stop / start: the masters drain and stop; the stop mark keeps them down through a
  reboot until `start` (or a rollout) clears it.
- scale N: the host's master.toml says N workers (so `config --diff` and a reboot
  see it), and the running master goes to N.
- remove: masters stopped, units disabled and deleted, master.toml gone; `--purge`
  deletes deploy_to too.

Each takes the deploy lock (no rollout runs beside it) and is recorded in history.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from deployer.errors import BadInput, StepFailed
from deployer.hostapi import calls
from deployer.hostapi.answers import HostState
from deployer.hostapi.layout import utc_stamp
from deployer.hostapi.options import to_toml
from deployer.inventory import master_label
from deployer.lock import FleetLocks, Owner
from deployer.masters import supervise
from deployer.plan import split_batches
from deployer.remote import RemoteHost
from deployer.rollout import (
    Outcome,
    check_agents,
    look_again,
    looked_at,
    serve_host,
)
from deployer.session import FleetSession

Body = Callable[[dict[str, HostState]], Outcome]  # an action, given each host's state


def _locked(fleet: FleetSession, action: str, body: Body) -> Outcome:
    """`body` under the deploy lock, with each host's state as read right after it
    was taken (one call a host: the agent's version is checked in it); its outcome
    recorded in history."""
    from deployer.deploy_hooks import performer

    inv = fleet.inventory
    owner = Owner(inv.app.name, "", action)
    owner = replace(owner, id=f"{utc_stamp()}-{action}-{owner.id[:4]}")
    started = time.monotonic()
    fleet.open_all()
    with FleetLocks(fleet, owner):
        entry: dict[str, Any] = {
            "id": owner.id, "action": action, "revision": None, "release": None,
            "user": owner.user, "performer": performer(), "controller": owner.controller,
            "started": owner.since, "hosts": fleet.names, "roles": fleet.role_names,
        }  # fmt: skip
        states, failed = check_agents(fleet, fleet.names)
        if failed:
            raise fleet.first_error(failed)
        outcome = body(states)
        outcome.releases = {n: s.current for n, s in states.items()}
        seconds = round(time.monotonic() - started, 2)
        entry.update(
            result="ok" if outcome.ok else "failed", failed_step=outcome.step,
            failures=outcome.failed, duration_s=seconds, releases=outcome.releases, note=None,
        )  # fmt: skip
        fleet.history.append(entry)
    say = fleet.reporter.say
    if outcome.ok:
        say(f"{action} ok in {seconds}s on {', '.join(fleet.names)}")
    else:
        say(f"{action} FAILED at {outcome.step} after {seconds}s")
        for n, why in outcome.failed.items():
            say(f"  {n}: {why}")
    return outcome


def _each_host(fleet: FleetSession, step: str, fn: Callable[[RemoteHost, HostState], None]) -> Body:
    """`fn(remote, state)` on every host in parallel; a host that fails fails `step`."""

    def body(states: dict[str, HostState]) -> Outcome:
        _, failed = fleet.each(fleet.names, lambda remote: fn(remote, states[remote.name]))
        return Outcome(ok=not failed, failed=failed, step=step if failed else None)

    return body


def _each_master(
    fleet: FleetSession, fn: Callable[[RemoteHost, str | None, HostState], None]
) -> Body:
    """`fn(remote, role, state)` for every role with a master, hosts in parallel."""

    def host(remote: RemoteHost, state: HostState) -> None:
        for role in remote.config.roles:
            if remote.master_for(role.name) is not None:
                fn(remote, role.name, state)

    return _each_host(fleet, "master", host)


def reload(fleet: FleetSession) -> Outcome:
    """Replace every worker, batch by batch as a rollout switches (canary first),
    health-checked and watched; the first batch that fails stops it there. The
    release does not change, so nothing is rolled back: a master whose reload failed
    keeps its old workers serving."""
    r = fleet.inventory.rollout

    def body(_states: dict[str, HostState]) -> Outcome:
        batches = split_batches(fleet.names, r.canary, r.batch)
        for i, batch in enumerate(batches):
            watch = r.watch if i == 0 else 0.0  # the canary's, as in a rollout
            _, failed = fleet.each(batch, lambda remote, w=watch: serve_host(fleet, remote, w))
            on = [n for n in fleet.run.switched_at if n not in failed]
            failed.update(look_again(fleet, looked_at(i, len(batches), bool(r.watch), batch, on)))
            if failed:
                return Outcome(ok=False, failed=failed, step="reload")
        return Outcome(ok=True)

    return _locked(fleet, "reload", body)


def stop(fleet: FleetSession) -> Outcome:
    """Each master drains its workers and exits; the stop mark keeps it down."""
    say = fleet.reporter.say

    def one(remote: RemoteHost, role: str | None, state: HostState) -> None:
        remote.lifecycle("stop", role)
        who = master_label(role)
        if not state.master_of(role).running:
            say(f"{who} not running; marked stopped", remote.name)
            return
        remote.stop_master(role)
        say(f"{who} stopped (its workers drained); stays down until `deployer app start`",
            remote.name)  # fmt: skip

    return _locked(fleet, "stop", _each_master(fleet, one))


def start(fleet: FleetSession) -> Outcome:
    """The stop mark cleared, each master started where it is not running (on the
    release `current` names), its health checked."""
    say = fleet.reporter.say

    def one(remote: RemoteHost, role: str | None, state: HostState) -> None:
        remote.lifecycle("start", role)
        who = master_label(role)
        if state.current is None:
            raise StepFailed(remote.name, "start", "no release yet: `deployer rollout` first")
        if state.master_of(role).running:
            say(f"{who} already running", remote.name)
        else:
            remote.start_master(on_line=lambda s: say(f"{who}: {s}", remote.name), role=role)
            supervise(remote, say, role)
            say(f"{who} started", remote.name)
        result = remote.health(role)
        if result is not None:
            say(f"{who} healthy, {result.probes} probe(s)", remote.name)

    return _locked(fleet, "start", _each_master(fleet, one))


def scale(fleet: FleetSession, workers: int) -> Outcome:
    """The selected role's masters (with roles: --roles names one) to `workers`
    workers, in their master.toml too: a reboot, `config --diff` and `status` see
    it; the next `deployer setup` writes the inventory's number again (put it there
    to keep it)."""
    if not 1 <= workers <= 10_000:
        raise BadInput(f"scale: expected a number of workers from 1 to 10000, got {workers}")
    say = fleet.reporter.say
    roles = fleet.role_names
    if len(roles) > 1:
        raise BadInput(f"scale: name one role with --roles (these hosts run {', '.join(roles)})")
    role = roles[0] if roles else None

    def one(remote: RemoteHost, state: HostState) -> None:
        master = remote.master_for(role)
        if master is None:
            return  # the host does not run that role
        scaled = dataclasses.replace(master, workers=workers)
        remote.call(calls.setup(master_toml=to_toml(scaled), role=role))
        who = master_label(role)
        if state.master_of(role).running:
            remote.scale_master(workers, role)
            say(f"{who} scaled to {workers} workers (master.toml too)", remote.name)
        else:
            say(f"{who} not running: master.toml says {workers} workers", remote.name)

    return _locked(fleet, "scale", _each_host(fleet, "scale", one))


def remove(fleet: FleetSession, purge: bool) -> Outcome:
    """Masters stopped, units disabled and deleted, each role's master.toml removed;
    `purge`: then deploy_to itself (releases, shared files, secrets) deleted."""
    say = fleet.reporter.say
    if purge and fleet.role_names and set(fleet.role_names) != set(fleet.inventory.roles):
        raise BadInput("remove --purge deletes deploy_to, every role's: not with --roles")

    def one(remote: RemoteHost, state: HostState) -> None:
        for role in remote.config.roles:
            who = master_label(role.name)
            if state.master_of(role.name).running:
                remote.stop_master(role.name)
                say(f"{who} stopped", remote.name)
            u = remote.call(calls.unit(remote.config.app.name, "none", 60, role.name))
            if u.removed:
                say(f"unit {u.unit} disabled and removed", remote.name)
            for note in u.notes:
                say(f"  {note}", remote.name)
            remote.lifecycle("remove", role.name)

    outcome = _locked(fleet, "remove", _each_host(fleet, "remove", one))
    if purge and outcome.ok:  # after the host locks are released: they live in deploy_to

        def gone(remote: RemoteHost) -> None:
            remote.lifecycle("purge")
            say(f"{remote.layout.root} removed", remote.name)

        _, failed = fleet.each(fleet.names, gone)
        if failed:
            return Outcome(ok=False, failed=failed, step="purge")
    return outcome
