"""`deployer doctor`: a read-only preflight of each host, before `deployer setup` ever
ran: ssh, python, disk, layout, systemd, the listen address, the clock (the
agent-less probe, hostapi/probe.py)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

from deployer.drift import run_probe
from deployer.errors import DeployerError
from deployer.fleet import STATUS_WINDOW
from deployer.hostapi import answers
from deployer.hostapi.options import MasterConfig
from deployer.inventory import HostConfig
from deployer.remote import RemoteHost
from deployer.report import short_error
from deployer.session import FleetSession
from deployer.transport import LocalHost

MIN_FREE_MB = 100.0
MIN_FREE_SHARE = 0.05
MAX_SKEW_S = 5.0
MIN_PYTHON = (3, 9)


@dataclasses.dataclass
class Check:
    check: str
    status: str  # ok | FAIL | info | skip
    detail: str


def doctor(session: FleetSession, timeout: float) -> list[dict[str, Any]]:
    """`deployer doctor`: per host, one row per check, reading only. Connection
    attempts are cut to `timeout`: a host that does not answer is reported, not
    waited out."""
    hosts = shortened([r.config for r in session.remotes.values()], timeout)

    def one(remote: RemoteHost) -> list[Check]:
        return examine(remote, timeout)

    with FleetSession(session.inventory, hosts, session.state_dir, session.reporter) as quick:
        results, failures = quick.each_within(quick.names, one, timeout + 45)
    rows = []
    for n in session.names:
        checks = results.get(n) or [Check("ssh", "FAIL", failures.get(n, "no answer"))]
        rows.append(
            {
                "host": n,
                "ok": all(c.status != "FAIL" for c in checks),
                "checks": [dataclasses.asdict(c) for c in checks],
            }
        )
    return rows


REST = ("python", "disk", "layout", "systemd", "listen", "clock")


def examine(remote: RemoteHost, timeout: float) -> list[Check]:
    checks: list[Check] = []
    cfg = remote.config
    if isinstance(remote.transport, LocalHost):
        checks.append(Check("ssh", "info", 'transport = "local": this machine, no SSH'))
    else:
        where = f"{cfg.ssh.user + '@' if cfg.ssh.user else ''}{cfg.address}:{cfg.port}"
        try:
            remote.transport.connection()  # type: ignore[attr-defined]
        except DeployerError as e:
            checks.append(Check("ssh", "FAIL", short_error(e, remote.name)))
            return checks + [Check(c, "skip", "not checked: no connection") for c in REST]
        checks.append(Check("ssh", "ok", f"{where}: connected, host key verified"))
    roles = [r.name for r in cfg.masters] or [None]
    master = remote.master_for(roles[0])
    listen = None if master is None else master.listen
    before = time.time()
    try:
        probe = run_probe(remote, listen, 30.0, roles[0])
    except DeployerError as e:
        checks.append(Check("python", "FAIL", short_error(e, remote.name)))
        return checks + [Check(c, "skip", "not checked: no python") for c in REST[1:]]
    after = time.time()
    checks.append(_python(probe, cfg.ssh.python))
    checks.append(_disk(probe.disk, cfg.app.deploy_to))
    checks.append(_layout(probe, cfg.app.deploy_to, remote.layout.dirs()))
    checks.append(_systemd(probe.systemd, [m for r in cfg.masters if (m := r.master)]))
    if probe.agent.state == "same":  # set up: each master's unit, as status reads it
        checks += [_boot(remote, role, timeout) for role in roles]
    checks.append(_listen(probe.listen, listen, roles[0]))
    for role in roles[1:]:  # each role's master binds its own listen, or none
        other = remote.master_for(role)
        spec = None if other is None else other.listen
        found = run_probe(remote, spec, 30.0, role).listen if spec else answers.ProbeListen()
        checks.append(_listen(found, spec, role))
    checks.append(_clock(probe.time, before, after))
    return checks


def _python(probe: answers.Probe, python: str) -> Check:
    try:
        version = tuple(int(x) for x in probe.python.split(".")[:2])
    except ValueError:
        return Check("python", "FAIL", f"{python}: unreadable version {probe.python!r}")
    text = f"{probe.python} ({probe.executable})"
    if version < MIN_PYTHON:
        return Check("python", "FAIL", f"{text}: the host agent needs Python 3.9 or later")
    return Check("python", "ok", text)


def _disk(disk: answers.ProbeDisk, deploy_to: str) -> Check:
    if disk.error is not None:
        return Check("disk", "FAIL", f"could not measure the space under {deploy_to}: {disk.error}")
    mb = 1024 * 1024
    free, total = disk.free, disk.total
    share = free / total if total else 0.0
    text = f"{free / mb:.1f} MB free of {total / mb:.1f} MB ({share:.0%}) under {disk.path}"
    if free / mb < MIN_FREE_MB:
        return Check("disk", "FAIL", f"{text}: less than {MIN_FREE_MB:g} MB")
    if share < MIN_FREE_SHARE:
        return Check("disk", "FAIL", f"{text}: less than {MIN_FREE_SHARE:.0%} free")
    return Check("disk", "ok", text)


def _layout(probe: answers.Probe, deploy_to: str, remote_dirs: Sequence[Any]) -> Check:
    lay, user = probe.layout, probe.user.name
    state = lay.state
    if lay.error is not None:
        return Check("layout", "FAIL", f"could not check {deploy_to}: {lay.error}")
    if state == "missing":
        if not lay.writable:
            return Check(
                "layout", "FAIL",
                f"{deploy_to} does not exist and {user} cannot create it "
                f"({lay.parent} is not writable by {user})",
            )  # fmt: skip
        return Check("layout", "ok", f"{deploy_to} not set up yet: run `deployer setup`")
    if state == "untrusted":
        return Check("layout", "FAIL", str(lay.why))
    if state == "not-writable":
        return Check("layout", "FAIL", f"not writable by {user}: {', '.join(lay.dirs)}")
    if state == "incomplete":
        missing = [os.path.basename(d) for d in lay.missing]
        if len(missing) == len(remote_dirs):  # an empty directory, made for setup
            return Check("layout", "ok", f"{deploy_to} not set up yet: run `deployer setup`")
        lacks = ", ".join(missing)
        return Check("layout", "ok", f"{deploy_to} lacks {lacks}: `deployer setup` makes them")
    agent = {"same": "agent up to date", "differs": "agent differs: `deployer setup`"}.get(
        str(probe.agent.state), "no agent: `deployer setup`"
    )
    return Check("layout", "ok", f"{deploy_to} is {user}'s alone and writable; {agent}")


def _systemd(sd: answers.ProbeSystemd, masters: Sequence[MasterConfig]) -> Check:
    if sd.error is not None:
        return Check("systemd", "info", f"could not tell: {sd.error}")
    if sd.running:
        return Check("systemd", "info", "running: `deployer setup` installs a unit for the master")
    text = "not running here: nothing brings the master back after a reboot"
    if any(m.supervisor == "systemd" for m in masters):
        return Check("systemd", "FAIL", f'{text}, and [master] supervisor = "systemd" needs it')
    return Check("systemd", "info", text)


def _boot(remote: RemoteHost, role: str | None, timeout: float) -> Check:
    """Would `role`'s master come back after a reboot: what its unit runs at boot exists
    and is this role's (the status call's boot answer)."""
    name = "boot" if role is None else f"boot {role}"
    try:
        boot = remote.status(min(timeout, 10.0), STATUS_WINDOW, role).boot
    except DeployerError as e:
        return Check(name, "FAIL", short_error(e, remote.name))
    if boot is None:
        return Check(name, "info", "the host agent does not report it")
    if boot.comes_back:
        return Check(name, "ok", boot.why)
    return Check(name, "FAIL" if boot.unit else "info", boot.why)


def _listen(found: answers.ProbeListen, listen: str | None, role: str | None = None) -> Check:
    name = "listen" if role is None else f"listen {role}"
    if not listen:
        what = "[master]" if role is None else f"role {role}'s master"
        return Check(name, "info", f"no {what} listen in the inventory (binds no socket)")
    state = found.state
    if state == "free":
        return Check(name, "ok", f"{listen} is free")
    if state == "ours":
        return Check(name, "ok", f"{listen} is served by this app's master (pid {found.pid})")
    why = found.why or found.error or state
    return Check(name, "FAIL", f"{listen}: {why}")


def _clock(host_time: float, before: float, after: float) -> Check:
    skew = host_time - (before + after) / 2
    margin = (after - before) / 2
    ahead = "ahead of" if skew >= 0 else "behind"
    text = f"{abs(skew):.2f} s {ahead} this machine (±{margin:.2f} s)"
    if abs(skew) - margin > MAX_SKEW_S:
        return Check("clock", "FAIL", f"{text}: more than {MAX_SKEW_S:g} s")
    return Check("clock", "ok", text)


def shortened(hosts: Sequence[HostConfig], seconds: float) -> list[HostConfig]:
    """The hosts with connection attempts cut to `seconds` (a doctor reports a host
    that does not answer, it does not wait it out)."""
    return [
        dataclasses.replace(
            h,
            ssh=dataclasses.replace(
                h.ssh,
                retry_deadline=min(h.ssh.retry_deadline, seconds),
                connect_timeout=min(h.ssh.connect_timeout, seconds),
            ),
        )
        for h in hosts
    ]
