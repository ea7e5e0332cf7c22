"""The plan (pure data, printable with --dry-run) and its execution.

    lock -> prepare every host in parallel -> expand -> switch batch by batch
    (flip `current`, master reload, health) -> contract -> prune, record

Nothing that serves traffic changes before the first switch. After it, any
failure past `max_failed` puts every switched host back on the release it ran
before (on_failure = "rollback"), with the same reload-and-health procedure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from deployer import diagnose, migrating
from deployer.deploy_hooks import DeployHooks, performer
from deployer.errors import DeployerError, StepFailed
from deployer.history import private_state
from deployer.hostapi import answers, calls
from deployer.hostapi.answers import HostState
from deployer.hostapi.exits import EXIT_FAILED, EXIT_OK
from deployer.hostapi.layout import release_name, utc_stamp
from deployer.inventory import master_label
from deployer.lock import FleetLocks, Owner
from deployer.masters import reload_master, supervise
from deployer.migrating import run_migrations
from deployer.plan import Plan, plan_rollback
from deployer.remote import RemoteHost
from deployer.session import FleetSession

T = TypeVar("T")
Masters = HostState | answers.SwitchResult  # which masters of a host run: master_of(role)

# --- execution ------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    failed: dict[str, str] = field(default_factory=dict)  # host -> why
    step: str | None = None
    releases: dict[str, str | None] = field(default_factory=dict)  # host -> release it runs
    rolled_back: bool = False  # a failed rollout put its switched hosts back

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED


def switch_host(fleet: FleetSession, remote: RemoteHost, release: str, watch: float = 0) -> None:
    """Flip `current` once, then for each role on the host reload its master and
    check its health, one role after the other; then watch them all until `watch`
    seconds after the flip: one host's switch."""
    t0 = fleet.run.switched_at[remote.name] = time.monotonic()
    flipped = remote.switch(release, [r.name for r in remote.config.roles])
    fleet.run.switched_to[remote.name] = release
    fleet.reporter.say(f"switch: current -> {release}", remote.name)
    serve_host(fleet, remote, watch, f"switch {time.monotonic() - t0:.2f}s, ", release, flipped)


def serve_host(
    fleet: FleetSession,
    remote: RemoteHost,
    watch: float,
    timed: str = "",
    release: str | None = None,
    masters: Masters | None = None,
) -> None:
    """Every role's master on the host picks up `current` (reloaded, or started), its
    health checked, one role after the other; then all watched until `watch` seconds
    after the switch (or this reload) began, every crash since counted.
    A rollout's switch does this after the flip; `deployer app reload` alone.
    `release`: what `current` names (a failure says what its workers did);
    `masters`: which of them run, as the flip answered (else one state call)."""
    say = fleet.reporter.say
    began = fleet.run.switched_at.setdefault(remote.name, time.monotonic())
    if masters is None and remote.config.masters:  # one state for every role of the host
        state = remote.state()
        masters, release = state, release or state.current
    release = release or ""
    for role in remote.config.roles:
        t2 = time.monotonic()
        explained = partial(_explained, remote, release, [role.name])  # a failure's cause
        if masters is not None and remote.config.masters:
            explained(partial(reload, fleet, remote, role.name, masters))
        t3 = time.monotonic()
        result = explained(partial(remote.health, role.name))
        t4 = time.monotonic()
        who = "" if role.name is None else f"{role.name}: "
        probes = f", {result.probes} probe(s)" if result else " (no [health] configured)"
        say(
            f"{who}healthy{probes}; {timed}reload {t3 - t2:.2f}s, health {t4 - t3:.2f}s",
            remote.name,
        )
    if watch:
        since = time.monotonic() - began
        watched = _look(remote, release, round(max(0.0, watch - since), 2), since)
        if watched is not None:
            say(f"held up {watch:g}s: no crash, every worker ready", remote.name)


def _look(
    remote: RemoteHost, release: str, seconds: float, since: float
) -> answers.WatchResult | None:
    """Watch the host's masters and health URLs for `seconds`, a crash in the `since`
    seconds before counted too."""
    roles = [r.name for r in remote.config.roles]
    return _explained(remote, release, roles, partial(remote.watch, seconds, since))


def look_again(fleet: FleetSession, names: Sequence[str]) -> dict[str, str]:
    """Each host of `names` looked at once more, at once: a crash since its switch (its
    master keeps every crash on record, so this watch went on while later batches
    switched), a worker not ready or a failing health probe fails it. The failures."""

    def look(remote: RemoteHost) -> None:
        since = time.monotonic() - fleet.run.switched_at.get(remote.name, time.monotonic())
        _look(remote, fleet.run.switched_to.get(remote.name, ""), 0.0, since)

    return fleet.each(names, look).failed


def looked_at(
    index: int, count: int, watched: bool, batch: Sequence[str], on: list[str]
) -> list[str]:
    """Who is looked at again once batch `index` (of `count`) switched, of the hosts
    `on` the new release: the earlier batches' (their watch ran on beside this
    switch), and after the last batch this one's too, unless it was the first and
    `watched` for its full window already."""
    earlier = [n for n in on if n not in batch]
    if index < count - 1:
        return earlier
    return earlier if index == 0 and watched else on


def _explained(
    remote: RemoteHost, release: str, roles: list[str | None], step: Callable[[], T]
) -> T:
    """`step` (a reload, a health check, the watch), whose failure comes with what
    the masters of `roles` saw of `release`'s workers."""
    try:
        return step()
    except StepFailed as e:
        raise diagnose.with_cause(remote, roles, release, e) from None


def reload(fleet: FleetSession, remote: RemoteHost, role: str | None, state: Masters) -> None:
    """`role`'s master picks up `current`: reloaded, or started if `state` says it
    does not run."""
    if remote.master_for(role) is None:
        return
    say = fleet.reporter.say
    who = master_label(role)
    master = state.master_of(role)
    if not master.running:
        if master.stopped:  # a deploy (or `app start`) is the operator's word to run it again
            remote.lifecycle("start", role)
            say(f"{who} was stopped by `deployer app stop`: starting it", remote.name)
        else:
            say(f"{who} not running: starting it", remote.name)
        remote.start_master(on_line=lambda s: say(f"{who}: {s}", remote.name), role=role)
        supervise(remote, say, role)  # where systemd runs, its unit takes the master over
        return
    reload_master(remote, role, say, fleet.verbose)


def revert(
    fleet: FleetSession,
    before: dict[str, str | None],
    names: Sequence[str],
) -> dict[str, str]:
    """Put hosts back on the release they ran before, the same careful way. A host
    that ran none (its first deploy) stays as it is: returns what each such host was
    left with."""
    targets = [n for n in names if before.get(n)]
    left = {
        n: left_alone(fleet.remotes[n], fleet.run.switched_to.get(n))
        for n in names
        if not before.get(n)
    }
    for n, how in left.items():
        fleet.reporter.say(f"no previous release to go back to: {how}", n)
    _, failures = fleet.each(targets, lambda r: switch_host(fleet, r, before[r.name] or ""))
    for n in targets:
        if n not in failures:
            fleet.reporter.say(f"rolled back to {before[n]}", n)
    return left


def left_alone(remote: RemoteHost, release: str | None) -> str:
    """What a host with nothing to go back to is left with, as it is now: `current`
    where the switch put it, and whether its master (each role's) runs."""
    where = f"left on {release}" if release else "left with no release"
    roles = [r.name for r in remote.config.masters]
    if not roles:
        return where
    try:
        state = remote.state()
    except DeployerError as e:
        return f"{where}; whether its master runs is unknown: {e}"

    def runs(role: str | None) -> str:
        return "running" if state.master_of(role).running else "not running"

    if len(roles) == 1:
        return f"{where}, its master {runs(roles[0])}"
    return f"{where}, masters: " + ", ".join(f"{r} {runs(r)}" for r in roles)


def record(fleet: FleetSession, entry: dict[str, Any], names: Sequence[str]) -> None:
    """The entry in the controller's history and each host's; where a lock is held,
    its release goes in the same round trip (FleetLocks reads that answer)."""
    fleet.history.append(entry)
    locks = fleet.run.locks
    if locks is None:
        fleet.each(names, lambda r: r.record(entry))
        return
    call, unlock, held = calls.record(entry), locks.release_call(), set(locks.held)

    def put(r: RemoteHost) -> Any:
        pipelined = getattr(r, "_call_then", None)  # a RemoteHost (tests use fakes)
        if r.name in held and pipelined is not None:
            return pipelined(call, unlock)
        return r.record(entry)

    fleet.each(names, put)


def check_agents(
    fleet: FleetSession, names: Sequence[str]
) -> tuple[dict[str, HostState], dict[str, str]]:
    """State of each host, refusing an agent of another version than ours."""
    from deployer.bundle import facts

    ours = facts().id

    def check(remote: RemoteHost) -> HostState:
        state = remote.state()  # carries the agent's bundle id: one call for both
        if state.bundle != ours:
            raise StepFailed(
                remote.name,
                "version check",
                f"host agent is {state.bundle or 'an older one'}, this controller is {ours}: "
                "run `deployer setup`",
            )
        return state

    return fleet.each(names, check)


def _sorts_last(release: str, sha: str, states: dict[str, HostState]) -> str:
    """`release`, or the same commit stamped one second after the newest release of
    these hosts when that one has the same stamp (or a later one): `previous` and
    rollback go by name order, and a rollout can now finish within a second."""
    import datetime as dt

    stamps = [r[:14] for s in states.values() for r in s.release_names if r != release]
    newest = max(stamps, default="")
    if not sha or newest < release[:14]:
        return release
    try:
        after = dt.datetime.strptime(newest, "%Y%m%d%H%M%S") + dt.timedelta(seconds=1)
    except ValueError:  # not a release name of ours
        return release
    return release_name(sha, after.replace(tzinfo=dt.UTC))


# --- the two flows --------------------------------------------------------------------


def run_rollout(
    fleet: FleetSession,
    plan: Plan,
    source: Any,
    revision: Any,
    deploy_id: str | None = None,
    log: str | None = None,
    pre_deploy_done: bool = False,
) -> Outcome:
    """The rollout between the controller's deploy hooks (deployer.deploy_hooks):
    pre-deploy before any lock (unless the push's pre-receive ran it for this very
    revision), post-deploy, post-rollback or on-failure after. `revision`: what
    `source` (a deployer.sync.Source) resolved the plan's revision to, once."""
    private_state(fleet.state_dir)  # the lock and history's: refused before a hook or a host
    inv = fleet.inventory
    hooks = DeployHooks(
        inv.path, fleet.reporter.say, "rollout", inv.app.name, inv.destination, plan.hosts
    )
    hooks.revision, hooks.log = plan.revision, log
    hooks.release = next(iter(plan.targets.values()), None)
    hooks.roles = fleet.role_names
    if not pre_deploy_done:
        hooks.pre_deploy()
    started = time.monotonic()
    with hooks.on_error(started):
        outcome = _rollout(fleet, plan, source, revision, deploy_id, log)
    hooks.finished(outcome.ok, outcome.rolled_back, time.monotonic() - started)
    return outcome


def _rollout(
    fleet: FleetSession,
    plan: Plan,
    source: Any,
    revision: Any,
    deploy_id: str | None = None,
    log: str | None = None,
) -> Outcome:
    """Execute a rollout plan; the caller holds nothing, this takes the locks.

    `deploy_id` names the rollout (history, lock owner) when the caller already
    told someone its name (the post-update hook names the log after it)."""
    from deployer.sync import pack_for_host

    say = fleet.reporter.say
    release = next(iter(plan.targets.values()))
    owner = Owner(plan.app, plan.revision or "", "rollout")
    # the lock names the rollout by its history id: a taker of its stale lock can
    # then mark that very entry interrupted
    owner = replace(owner, id=deploy_id or f"{release}-{owner.id[:4]}")
    started = time.monotonic()
    entry: dict[str, Any] = {
        "id": owner.id,
        "log": log,
        "action": "rollout",
        "revision": plan.revision,
        "release": release,
        "user": owner.user,
        "performer": performer(),
        "controller": owner.controller,
        "started": owner.since,
        "hosts": plan.hosts,
        "roles": fleet.role_names,
    }
    outcome = Outcome(ok=False)
    fleet.open_all()
    with FleetLocks(fleet, owner, then=calls.state()):
        fleet.history.append({**entry, "result": "running"})  # a SIGKILL leaves this
        say(f"rollout {plan.revision} as {release} to {', '.join(plan.hosts)}")
        states, failed = check_agents(fleet, plan.hosts)
        before = {n: s.current for n, s in states.items()}
        outcome.releases = dict(before)
        later = _sorts_last(release, plan.revision or "", states)
        if later != release:
            say(f"release {release} would not sort after one made in the same second: {later}")
            release = entry["release"] = later

        def prepare(remote: RemoteHost) -> None:
            t0 = time.monotonic()
            pack = pack_for_host(source, revision, states[remote.name].have)
            remote.prepare(
                plan.revision or "", release, pack, on_line=lambda s: say(s, remote.name)
            )
            say(
                f"prepared: sent {len(pack or b'')} bytes, release ready in "
                f"{time.monotonic() - t0:.2f}s",
                remote.name,
            )

        _, prep_failed = fleet.each([n for n in plan.hosts if n not in failed], prepare)
        failed.update(prep_failed)
        if len(failed) > plan.max_failed:
            return _finish(
                fleet, entry, outcome, failed, "prepare", started, "no host was switched"
            )
        try:
            run_migrations(fleet, "contract", "current", deferred=True)
            run_migrations(fleet, "expand", release)
        except DeployerError as e:
            return _finish(
                fleet,
                entry,
                outcome,
                {"migrations": str(e)},
                "expand",
                started,
                "no host was switched",
            )
        # Hosts whose switch began: from then on `current` may point at the new release,
        # whatever the switch itself got to (a signal can come in the middle of it).
        touched: list[str] = []
        reverted: set[str] = set()  # tolerated failures, already put back

        def switch(remote: RemoteHost, watch: float) -> None:
            touched.append(remote.name)
            switch_host(fleet, remote, release, watch)

        def on_new_release() -> list[str]:
            return [n for n in touched if n not in reverted]

        try:
            for i, batch in enumerate(plan.batches):
                todo = [n for n in batch if n not in failed]
                watch = plan.watch if i == 0 else 0.0  # the canary's, before any other switches
                _, bad = fleet.each(todo, lambda r, w=watch: switch(r, w))
                for n in todo:
                    outcome.releases[n] = release
                on = [n for n in on_new_release() if n not in bad and n not in failed]
                again = looked_at(i, len(plan.batches), bool(plan.watch), todo, on)
                bad.update(look_again(fleet, again))
                failed.update(bad)
                if len(failed) > plan.max_failed:
                    return _abort(
                        fleet, plan, entry, outcome, failed, before, on_new_release(), started
                    )
                if bad:  # tolerated: those hosts go back and stay out of the rollout
                    revert(fleet, before, list(bad))
                    for n in bad:
                        outcome.releases[n] = before.get(n)
                    reverted.update(bad)
        except KeyboardInterrupt:
            say("interrupted: putting switched hosts back")
            for n in on_new_release():
                outcome.releases[n] = fleet.run.switched_to.get(n, before.get(n))
            _abort(
                fleet,
                plan,
                entry,
                outcome,
                {"interrupted": "Ctrl-C or SIGTERM"},
                before,
                on_new_release(),
                started,
            )
            raise
        switched = on_new_release()
        try:
            run_migrations(fleet, "contract", release)
        except DeployerError as e:
            # Contract only ever follows healthy hosts: they stay on the new code.
            failed["migrations"] = str(e)
            note = "hosts stay on the new release (safe: contract runs last)"
            return _finish(fleet, entry, outcome, failed, "contract", started, note)
        _, prune_failed = fleet.each(switched, lambda r: r.prune())
        for n, why in prune_failed.items():
            say(f"warning: prune failed: {why}", n)
        outcome.ok = True
        outcome.failed = failed
        return _finish(fleet, entry, outcome, failed, None, started, None)


def _abort(
    fleet: FleetSession,
    plan: Plan,
    entry: dict[str, Any],
    outcome: Outcome,
    failed: dict[str, str],
    before: dict[str, str | None],
    touched: list[str],
    started: float,
) -> Outcome:
    if plan.on_failure == "rollback":
        fleet.reporter.say(f"rolling back {', '.join(touched) or 'nothing'}")
        left = revert(fleet, before, touched)
        rolled = [n for n in touched if n not in left]
        outcome.rolled_back = bool(rolled)
        # what each host's `current` is now, whether or not its reload and health went well
        for n in touched:
            outcome.releases[n] = fleet.run.switched_to.get(n, before.get(n))
        note = rolled_back_note(outcome.releases, before, rolled, left)
    else:
        note = "halted: " + ", ".join(f"{n} runs {r}" for n, r in outcome.releases.items())
    return _finish(fleet, entry, outcome, failed, "switch", started, note)


def rolled_back_note(
    releases: dict[str, str | None],
    before: dict[str, str | None],
    rolled: list[str],
    left: dict[str, str],
) -> str:
    """One sentence per kind of host: those put back (and where that failed), and
    those with nothing to go back to, as they were left."""
    parts = []
    if rolled:
        runs = ", ".join(f"{n} runs {releases.get(n) or 'no release'}" for n in rolled)
        still = [n for n in rolled if releases[n] != before[n]]
        parts.append(
            f"switched hosts rolled back ({runs})"
            + (f"; rollback FAILED on {', '.join(still)}" if still else "")
        )
    parts += [f"{n} had no previous release: {how}" for n, how in left.items()]
    return "; ".join(parts) or "no host was switched"


def _finish(
    fleet: FleetSession,
    entry: dict[str, Any],
    outcome: Outcome,
    failed: dict[str, str],
    step: str | None,
    started: float,
    note: str | None,
) -> Outcome:
    outcome.failed = failed
    outcome.step = step
    entry.update(
        result="ok" if outcome.ok else "failed",
        failed_step=step,
        failures=failed,
        note=note,
        duration_s=round(time.monotonic() - started, 2),
        releases=outcome.releases,
    )
    try:
        record(fleet, entry, [n for n in fleet.remotes if n not in failed])
    except DeployerError as e:
        fleet.reporter.say(f"warning: could not record history: {e}")
    say = fleet.reporter.say
    if outcome.ok:
        say(
            f"{entry['action']} ok in {entry['duration_s']}s: "
            + ", ".join(f"{n} on {r}" for n, r in outcome.releases.items())
        )
    else:
        say(
            f"{entry['action']} FAILED at {step} after {entry['duration_s']}s"
            + (f": {note}" if note else "")
        )
    if failed and outcome.ok:
        say(f"{len(failed)} host(s) failed within max_failed and stay on their old release:")
    for n, why in failed.items():
        say(f"  {n}: {why}")
    return outcome


def run_rollback(
    fleet: FleetSession,
    to: str | None,
    dry_run: bool,
    force: bool = False,
    migrations: bool = False,
) -> tuple[Plan, Outcome | None]:
    """The rollback, then the controller's post-rollback or on-failure hook."""
    private_state(fleet.state_dir)  # the lock and history's: refused before a hook or a host
    inv = fleet.inventory
    hooks = DeployHooks(
        inv.path, fleet.reporter.say, "rollback", inv.app.name, inv.destination, fleet.names
    )
    hooks.roles = fleet.role_names
    started = time.monotonic()
    with hooks.on_error(started):
        plan, outcome = _rollback(fleet, to, dry_run, force, migrations)
    if outcome is not None:
        targets = sorted(set(plan.targets.values()))
        hooks.release = ",".join(targets)
        rollouts = [e for e in fleet.history.entries() if e.get("action") == "rollout"]
        known = {e.get("release"): e.get("revision") for e in reversed(rollouts)}
        hooks.revision = ",".join(str(known.get(t) or "") for t in targets)
        hooks.finished(outcome.ok, False, time.monotonic() - started)
    return plan, outcome


def _rollback(
    fleet: FleetSession,
    to: str | None,
    dry_run: bool,
    force: bool = False,
    migrations: bool = False,
) -> tuple[Plan, Outcome | None]:
    names = list(fleet.remotes)
    owner = Owner(fleet.inventory.app.name, to or "previous", "rollback")
    owner = replace(owner, id=f"{utc_stamp()}-rollback-{owner.id[:4]}")
    fleet.open_all()
    with FleetLocks(fleet, owner, then=calls.state()):
        states, failed = check_agents(fleet, names)
        if failed:
            raise fleet.first_error(failed)
        plan = plan_rollback(fleet.inventory, states, to)
        oldest = min(plan.targets.values())
        rows = migrating.applied(fleet)
        left = migrating.check_rollback(rows, oldest, force)
        if left:
            fleet.reporter.say(
                "migrations applied by the releases being left: "
                + "; ".join(left)
                + ("" if migrations else " (they stay applied; --migrations reverts expand ones)")
            )
        if dry_run:
            return plan, None
        started = time.monotonic()
        before = {n: s.current for n, s in states.items()}
        entry: dict[str, Any] = {
            "id": owner.id,
            "action": "rollback",
            "revision": None,
            "release": to,
            "user": owner.user,
            "performer": performer(),
            "controller": owner.controller,
            "started": owner.since,
            "hosts": names,
            "roles": fleet.role_names,
        }
        outcome = Outcome(ok=False, releases=dict(before))
        fleet.history.append({**entry, "result": "running"})
        for i, batch in enumerate(plan.batches):
            _, bad = fleet.each(batch, lambda r: switch_host(fleet, r, plan.targets[r.name]))
            for n in batch:
                outcome.releases[n] = plan.targets[n]
            on = [n for n in fleet.run.switched_to if n not in bad]
            bad.update(look_again(fleet, looked_at(i, len(plan.batches), False, batch, on)))
            if bad:
                revert(fleet, before, list(bad))
                for n in bad:
                    outcome.releases[n] = before[n]
                return plan, _finish(
                    fleet,
                    entry,
                    outcome,
                    bad,
                    "switch",
                    started,
                    "halted; failed hosts returned to where they were",
                )
        if migrations and left:
            try:
                newer = [r.release for r in rows if r.release and r.release > oldest]
                migrating.down_expand(fleet, newer)
            except DeployerError as e:
                return plan, _finish(
                    fleet,
                    entry,
                    outcome,
                    {"migrations": str(e)},
                    "migrations down",
                    started,
                    "hosts are back; schema is not",
                )
        outcome.ok = True
        return plan, _finish(fleet, entry, outcome, {}, None, started, None)
