"""Fleet-wide operations that are not a rollout: setup and status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployer.bundle import build
from deployer.hostapi import answers
from deployer.inventory import HostConfig, RoleConfig, master_label
from deployer.lock import describe
from deployer.masters import apply_to_running_master, reload_master, supervise
from deployer.remote import RemoteHost
from deployer.session import FleetSession


def setup(fleet: FleetSession) -> dict[str, str]:
    """Idempotent: layout, agent zipapp, master.toml, master running if there is a
    release to run. Returns failures by host."""
    bundle = build()
    say = fleet.reporter.say

    def one(remote: RemoteHost) -> None:
        done = remote.install(bundle)
        for d in done.created:
            say(f"created {d}", remote.name)
        agent = "installed" if done.installed else "up to date"
        say(f"agent {bundle.id} {agent} at {remote.layout.pyz}", remote.name)
        # every role's toml written first (a role's master-<role>.toml: its own call),
        # then one state for all of them; every running master re-execs on a new agent
        written = {
            r.name: done if r.name is None else remote.configure(r.name)
            for r in remote.config.masters
        }
        state = remote.state()
        for role, wrote in written.items():
            setup_master(remote, role, wrote._replace(installed=done.installed), state, say)
        left_behind(remote, fleet.inventory.hosts[remote.name], state, say)

    _, failures = fleet.each(fleet.names, one)
    return failures


def left_behind(
    remote: RemoteHost,
    host: HostConfig,
    state: answers.HostState,
    say: Callable[[str, str], None],
) -> None:
    """A master toml of a role the inventory (`host`: all its roles, whatever --roles
    chose) no longer gives the host: said, not removed (its master may be serving;
    stopping it is the operator's call)."""
    wanted = {r.name or "" for r in host.masters}
    for role in state.masters:
        if role not in wanted:
            layout = remote.layout.for_role(role or None)
            say(
                f"warning: {layout.master_config} is for "
                + (f"role {role}, which" if role else "a master without roles, which")
                + " the inventory no longer gives this host; if its master runs, stop it "
                f"(`{layout.wrapper} master stop --config {layout.master_config}`) "
                "and remove the file",
                remote.name,
            )


def setup_master(
    remote: RemoteHost,
    role: str | None,
    done: answers.SetupResult,
    state: answers.HostState,
    say: Callable[[str, str], None],
) -> None:
    """One role's master after setup wrote its options: upgraded (the agent was just
    installed: `done.installed`) or started, and supervised."""
    layout = remote.layout.for_role(role)
    who = master_label(role)
    if done.config_changed:
        say(f"wrote {layout.master_config}", remote.name)
    for change in done.config_changes:
        say(f"  {change}", remote.name)
    if state.master_of(role).running:
        apply_to_running_master(remote, done, say, role)
    elif state.current:
        remote.start_master(on_line=lambda s: say(f"{who}: {s}", remote.name), role=role)
        say(f"{who} started", remote.name)
    else:
        say(f"no release yet: the first rollout starts the {who}", remote.name)
    supervise(remote, say, role)


def secrets(
    fleet: FleetSession, action: str, key: str, value: str | None, reload: bool
) -> dict[str, str]:
    """Set or unset a secret on every host; with `reload`, each master whose secret
    changed replaces its workers one by one (they read it when they start)."""
    say = fleet.reporter.say

    def one(remote: RemoteHost) -> None:
        done = remote.secrets(action, key, value)
        verb = {"set": "set", "unset": "removed"}[action]
        say(f"{key} {verb}" if done.changed else f"{key} unchanged", remote.name)
        if not (reload and done.changed):
            return
        state = remote.state()
        for role in remote.config.masters:
            if state.master_of(role.name).running:
                reload_master(remote, role.name, say, fleet.verbose)
                say(f"{master_label(role.name)}: workers reloaded with it", remote.name)

    _, failures = fleet.each(fleet.names, one)
    return failures


# a release directory in a master's progress line: said by its name
def secret_names(fleet: FleetSession) -> tuple[dict[str, list[str]], dict[str, str]]:
    results, failures = fleet.each(fleet.names, lambda r: r.secrets("list").keys)
    return {n: results[n] for n in fleet.names if n in results}, failures


STATUS_WINDOW = 300.0  # seconds: worker crashes this recent make a host not ok


def status(fleet: FleetSession, timeout: float) -> list[dict[str, Any]]:
    """Per host: release, each role's master and health, lock, and what is wrong with
    it; each host answers within `timeout` or is reported unreachable."""

    def one(remote: RemoteHost) -> dict[str, Any]:
        roles = remote.config.roles
        each = timeout / max(1, len(roles))  # the roles are asked one after the other
        return row(remote, [(r, remote.status(each, STATUS_WINDOW, r.name)) for r in roles])

    results, failures = fleet.each_within(fleet.names, one, timeout, grace=2)
    return [
        results[n] if n in results else {"host": n, "ok": False, "problems": [failures[n]]}
        for n in fleet.names
    ]


def row(
    remote: RemoteHost, answers_: list[tuple[RoleConfig, answers.HostStatus]]
) -> dict[str, Any]:
    """A host's status row: the host's own (release, lock) from the first answer,
    then each role's; a role's problems are prefixed with its name."""
    s = answers_[0][1]
    st = s.state
    problems = []
    if st.current is None:
        problems.append("no release")
    roles = []
    for role, answer in answers_:
        mine = role_problems(role, answer)
        prefix = "" if role.name is None else f"{role.name}: "
        problems += [prefix + p for p in mine]
        roles.append(
            {
                "role": role.name,
                "release": answer.state.release_of(role.name),  # the one it was switched to
                "master": None if answer.master is None else answer.master._asdict(),
                "master_running": answer.state.master.running,
                "health": answer.health,
                "boot": None if answer.boot is None else answer.boot._asdict(),
                "problems": mine,
            }
        )
    if s.lock is not None:
        problems.append(describe(s.lock, "deploy lock"))
    first = roles[0]
    return {
        "host": remote.name,
        "ok": not problems,
        "problems": problems,
        "current": st.current,
        "revision": st.current_revision,
        "previous": st.previous,
        "releases": len(st.releases),
        # the first role's, as before roles: a single-role host's one master
        "master": first["master"],
        "master_running": first["master_running"],
        "health": first["health"],
        "lock": None if s.lock is None else s.lock._asdict(),
        "boot": first["boot"],
        "roles": roles,
    }


def role_release(role: RoleConfig, st: answers.HostState) -> str:
    """What the role's workers should run, said for a problem line."""
    wanted = st.release_of(role.name)
    if wanted == st.current:
        return f"current is {st.current}"
    return f"the role was switched to {wanted} (current is {st.current})"


def role_problems(role: RoleConfig, s: answers.HostStatus) -> list[str]:
    """What is wrong with one role's master and health on a host."""
    st, m = s.state, s.master
    problems = []
    if role.master is not None:
        if not st.master.running and st.master.stopped:
            problems.append("stopped by `deployer app stop` (`deployer app start` starts it)")
        elif not st.master.running:
            hint = " (`deployer app start` starts it)" if st.current else ""
            problems.append("master not running" + hint)
        elif m is None:
            problems.append(f"master does not answer: {s.master_error}")
        else:
            if m.ready < m.configured:
                problems.append(f"{m.ready} of {m.configured} workers ready ({m.state})")
            # a role's own release: `rollout --roles R` moves `current` for R only
            wanted = st.release_of(role.name)
            if st.current is not None and m.release not in (st.current, wanted):
                problems.append(f"workers run {m.release}, {role_release(role, st)}")
            if m.recent_crashes:
                minutes = STATUS_WINDOW / 60
                problems.append(
                    f"{m.recent_crashes} worker crash(es) in the last {minutes:g} min, "
                    f"last {m.last_crash}"
                )
            if m.crash_loops:
                problems.append(f"{m.crash_loops} worker slot(s) in a crash loop")
    if s.health not in (None, "ok"):
        problems.append(f"health failing: {s.health}")
    boot = s.boot
    supervised = role.master is not None and role.master.supervisor != "none"
    if supervised and boot is not None and not boot.comes_back:
        problems.append(boot.why)  # the master would not come back after a reboot
    return problems
