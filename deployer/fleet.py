"""Fleet-wide operations that are not a rollout: setup and status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deployer.agent.bundle import build
from deployer.hostapi import answers, calls
from deployer.lock import describe
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
        if remote.config.master is None:
            return
        if done.config_changed:
            say(f"wrote {remote.layout.master_config}", remote.name)
        for change in done.config_changes:
            say(f"  {change}", remote.name)
        state = remote.state()
        if state.master.running:
            apply_to_running_master(remote, done, say)
        elif state.current:
            remote.start_master(on_line=lambda s: say(f"master: {s}", remote.name))
            say("master started", remote.name)
        else:
            say("no release yet: the first rollout starts the master", remote.name)
        supervise(remote, say)

    _, failures = fleet.each(fleet.names, one)
    return failures


def supervise(remote: RemoteHost, say: Callable[[str, str], None]) -> None:
    """The app's systemd unit on the host ([master] supervisor), so that a reboot
    brings the master back; says what changed, or in one line why it will not."""
    master = remote.master
    assert master is not None
    boot = master.worker_count(remote.cpus or 16) * (master.ready_timeout + master.ready_soak)
    deadline = boot + master.shutdown_timeout + 90  # where systemd runs, it starts the unit
    call = calls.unit(remote.config.app.name, master.supervisor, deadline)
    u: answers.UnitResult = remote.call(call)
    if u.unit is None or u.path is None:  # no systemd here, or supervisor = "none"
        gone = f"unit {u.unit} removed; " if u.removed else ""
        say(f"{gone}{u.boot}", remote.name)
        for note in u.notes:
            say(f"  {note}", remote.name)
        return
    what = "written" if u.written else "up to date"
    how = "enabled" if u.enabled_now else ("already enabled" if u.enabled else "NOT enabled")
    say(f"{u.scope} unit {u.unit} {what} ({u.path}), {how}", remote.name)
    if u.started:
        say(f"unit {u.unit}: {u.started}", remote.name)
    for note in u.notes:
        say(f"  {note}", remote.name)


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
        wanted = reload and done.changed and remote.config.master is not None
        if wanted and remote.state().master.running:
            remote.reload_master(on_line=lambda s: say(f"reload: {s}", remote.name))
            say("workers reloaded with it", remote.name)

    _, failures = fleet.each(fleet.names, one)
    return failures


def secret_names(fleet: FleetSession) -> tuple[dict[str, list[str]], dict[str, str]]:
    results, failures = fleet.each(fleet.names, lambda r: r.secrets("list").keys)
    return {n: results[n] for n in fleet.names if n in results}, failures


# master.toml keys a running master cannot take without a restart (bound or named
# at its start); the others it takes by an in-place upgrade, workers by scaling
RESTART_KEYS = ("listen", "socket", "pidfile", "log", "cwd")


def apply_to_running_master(
    remote: RemoteHost, done: answers.SetupResult, say: Callable[[str, str], None]
) -> None:
    """A new agent and changed options reach the running master with no request lost:
    the new code and options by a re-exec in place, workers by scaling."""
    changed = {c.split(":", 1)[0] for c in done.config_changes}
    restart = sorted(changed & set(RESTART_KEYS))
    live = changed - set(RESTART_KEYS) - {"workers", "supervisor"}  # supervisor: setup's own

    def line(s: str) -> None:
        say(f"master: {s}", remote.name)

    if done.installed:
        remote.upgrade_master(on_line=line)
        say("master upgraded in place: the new agent", remote.name)
    if live:  # by the new code: an older master ignores new options in an upgrade
        remote.upgrade_master(on_line=line, reconfigure=True)
        say(f"master upgraded in place: new {', '.join(sorted(live))}", remote.name)
    if "workers" in changed:
        master = remote.master
        assert master is not None
        remote.scale_master(master.worker_count(remote.cpus))
        say(f"master scaled to {master.worker_count(remote.cpus)} workers", remote.name)
    if restart:
        say(
            f"master still runs with its old {', '.join(restart)}: that takes a restart "
            "(`deployer master stop`, then `deployer setup`; it drops connections)",
            remote.name,
        )
    if not (done.installed or changed):
        say("master running, nothing to change", remote.name)


STATUS_WINDOW = 300.0  # seconds: worker crashes this recent make a host not ok


def status(fleet: FleetSession, timeout: float) -> list[dict[str, Any]]:
    """Per host: release, master, health, lock, and what is wrong with it; each host
    answers within `timeout` or is reported unreachable."""

    def one(remote: RemoteHost) -> dict[str, Any]:
        return row(remote, remote.status(timeout, STATUS_WINDOW))

    results, failures = fleet.each_within(fleet.names, one, timeout + 2)
    return [
        results[n] if n in results else {"host": n, "ok": False, "problems": [failures[n]]}
        for n in fleet.names
    ]


def row(remote: RemoteHost, s: answers.HostStatus) -> dict[str, Any]:
    st, m = s.state, s.master
    problems = []
    if st.current is None:
        problems.append("no release")
    if remote.config.master is not None:
        if not st.master.running:
            problems.append("master not running")
        elif m is None:
            problems.append(f"master does not answer: {s.master_error}")
        else:
            if m.ready < m.configured:
                problems.append(f"{m.ready} of {m.configured} workers ready ({m.state})")
            if m.release != st.current:
                problems.append(f"workers run {m.release}, current is {st.current}")
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
    if s.lock is not None:
        problems.append(describe(s.lock, "deploy lock"))
    boot = s.boot
    supervised = remote.master is not None and remote.master.supervisor != "none"
    if supervised and boot is not None and not boot.comes_back:
        problems.append(boot.why)  # the master would not come back after a reboot
    return {
        "host": remote.name,
        "ok": not problems,
        "problems": problems,
        "current": st.current,
        "revision": st.current_revision,
        "previous": st.previous,
        "releases": len(st.releases),
        "master": None if m is None else m._asdict(),
        "master_running": st.master.running,
        "health": s.health,
        "lock": None if s.lock is None else s.lock._asdict(),
        "boot": None if s.boot is None else s.boot._asdict(),
    }
