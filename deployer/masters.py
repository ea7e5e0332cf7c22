"""A host's masters, as the controller drives them: a reload (one line, or each
worker's progress), the options a running master takes (an in-place upgrade,
scaling), and the systemd unit that brings them back after a reboot. Used by
setup, rollout, rollback and the app's lifecycle commands alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from deployer.hostapi import answers, calls
from deployer.hostapi.options import taken_by
from deployer.inventory import master_label
from deployer.remote import RemoteHost


def supervise(remote: RemoteHost, say: Callable[[str, str], None], role: str | None = None) -> None:
    """The systemd unit of the app's (role's) master on the host ([master] supervisor),
    so that a reboot brings the master back; says what changed, or why it will not."""
    master = remote.master_for(role)
    assert master is not None
    # where systemd runs, setup starts the unit: its master's start, and a minute more
    deadline = master.reload_bound(remote.cpus or 16) + 60
    call = calls.unit(remote.config.app.name, master.supervisor, deadline, role)
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


RELEASE_PATH = re.compile(r"/\S*/releases/([^/\s]+)")
DONE = re.compile(r"ok in ([\d.]+)s(?:: release (\S+))?")


def reload_master(
    remote: RemoteHost, role: str | None, say: Callable[[str, str], None], verbose: bool = False
) -> None:
    """`role`'s master replaces its workers. A success is one line; each worker's
    progress (spawned, ready, draining, stopped) is said as it comes with `verbose`,
    else only if the reload fails, before the failure."""
    tag = "reload" if role is None else f"reload {role}"
    kept: list[str] = []

    def line(text: str) -> None:
        text = RELEASE_PATH.sub(r"\1", text)
        kept.append(text)  # the summary counts them
        if verbose:
            say(f"{tag}: {text}", remote.name)

    try:
        remote.reload_master(on_line=line, role=role)
    except BaseException:
        for text in [] if verbose else kept:
            say(f"{tag}: {text}", remote.name)
        raise
    say(f"{tag}: {reload_summary(kept)}", remote.name)


def reload_summary(lines: list[str]) -> str:
    """`2 workers replaced in 3.99s (release NAME)`, from a successful reload's lines."""
    replaced = sum(1 for t in lines if t.startswith("draining: "))
    done = next((m for t in reversed(lines) if (m := DONE.match(t))), None)
    took = f" in {done.group(1)}s" if done else ""
    release = f" (release {done.group(2)})" if done and done.group(2) else ""
    return f"{replaced} worker{'' if replaced == 1 else 's'} replaced{took}{release}"


def apply_to_running_master(
    remote: RemoteHost,
    done: answers.SetupResult,
    say: Callable[[str, str], None],
    role: str | None = None,
) -> None:
    """A new agent and changed options reach the running master with no request lost:
    the new code and options by a re-exec in place, workers by scaling."""
    changed = {c.key for c in done.config_changes}
    restart = sorted(changed & set(taken_by("restart")))
    live = changed & set(taken_by("upgrade"))

    who = master_label(role)

    def line(s: str) -> None:
        say(f"{who}: {s}", remote.name)

    if done.installed:
        remote.upgrade_master(on_line=line, role=role)
        say(f"{who} upgraded in place: the new agent", remote.name)
    if live:  # by the new code: an older master ignores new options in an upgrade
        remote.upgrade_master(on_line=line, reconfigure=True, role=role)
        say(f"{who} upgraded in place: new {', '.join(sorted(live))}", remote.name)
    if "workers" in changed:
        master = remote.master_for(role)
        assert master is not None
        remote.scale_master(master.worker_count(remote.cpus), role=role)
        say(f"{who} scaled to {master.worker_count(remote.cpus)} workers", remote.name)
    if restart:
        say(
            f"{who} still runs with its old {', '.join(restart)}: that takes a restart "
            "(`deployer master stop`, then `deployer setup`; it drops connections)",
            remote.name,
        )
    if not (done.installed or changed):
        say(f"{who} running, nothing to change", remote.name)
