"""Fleet-wide operations that are not a rollout: setup and status."""

from __future__ import annotations

from typing import Any

from deployer.agent.bundle import build
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
        state = remote.state()
        if state.master.running and done.installed:
            # A master of the old agent: re-exec it on the new one without a restart.
            remote.upgrade_master(on_line=lambda s: say(f"master: {s}", remote.name))
            say(f"master upgraded in place (pid {state.master.pid})", remote.name)
        elif state.master.running:
            say(f"master running (pid {state.master.pid})", remote.name)
        elif state.current:
            remote.start_master(on_line=lambda s: say(f"master: {s}", remote.name))
            say("master started", remote.name)
        else:
            say("no release yet: the first rollout starts the master", remote.name)

    _, failures = fleet.each(fleet.names, one)
    return failures


def status(fleet: FleetSession) -> list[dict[str, Any]]:
    """Per host: current release and revision, master, health."""

    def one(remote: RemoteHost) -> dict[str, Any]:
        st = remote.state()
        row: dict[str, Any] = {
            "host": remote.name,
            "current": st.current,
            "revision": st.current_revision,
            "previous": st.previous,
            "releases": len(st.releases),
            "master": st.master._asdict(),
            "health": None,
        }
        if remote.config.health is not None and st.current:
            try:
                remote.health()
                row["health"] = "ok"
            except Exception as e:  # noqa: BLE001 - any failure is the answer here
                row["health"] = f"failing: {e}"
        return row

    results, failures = fleet.each(fleet.names, one)
    rows = [results[n] for n in fleet.names if n in results]
    rows += [{"host": n, "error": why} for n, why in failures.items()]
    return rows
