"""Boot persistence: the app's systemd unit, installed, enabled, reported."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from deployer.agent.ops.common import AgentError
from deployer.agent.ops.release import master_state
from deployer.hostapi import answers, trust
from deployer.hostapi.layout import Layout

# Tests and image builds: system units go under this root (systemctl --root), and the
# running systemd, if any, is never asked anything.
SYSTEMD_ROOT_ENV = "DEPLOYER_SYSTEMD_ROOT"

LINGER_DIR = "/var/lib/systemd/linger"  # logind's record of who lingers


class _Systemd:
    """Where this user's units go on this host, and systemctl for them: a system unit
    when we are root, else a user unit (the user's own systemd, with lingering)."""

    def __init__(self) -> None:
        import pwd

        self.root = os.environ.get(SYSTEMD_ROOT_ENV) or None
        self.scope = "system" if os.geteuid() == 0 else "user"
        try:
            self.user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            self.user = str(os.geteuid())
        self.systemctl = shutil.which("systemctl")
        self.running = self.root is None and _systemd_booted()
        self.target = "multi-user.target" if self.scope == "system" else "default.target"

    @property
    def unit_dir(self) -> Path:
        if self.scope == "system":
            return Path(self.root or "/") / "etc" / "systemd" / "system"
        config = os.environ.get("XDG_CONFIG_HOME", "")
        base = Path(config) if config.startswith("/") else Path.home() / ".config"
        return base / "systemd" / "user"

    def ctl(self, *args: str, timeout: float = 30.0) -> tuple[bool, str]:
        """Run systemctl for our scope; (succeeded, its last words)."""
        assert self.systemctl is not None
        argv = [self.systemctl, *(["--user"] if self.scope == "user" else [])]
        argv += [f"--root={self.root}"] if self.root else []
        try:
            r = subprocess.run(
                [*argv, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return False, f"no answer within {timeout:g}s"
        text = " ".join((r.stderr or r.stdout).split())
        return r.returncode == 0, text[-400:] or f"exit {r.returncode}"

    def flag(self) -> str:
        return "--user " if self.scope == "user" else ""


def _systemd_booted() -> bool:
    return os.path.isdir("/run/systemd/system")  # sd_booted(): systemd is PID 1


def unit(layout: Layout, app: str, supervisor: str) -> answers.UnitResult:
    """The app's systemd unit (`deployer setup`): installed and enabled, so that a
    reboot brings the master back; where systemd runs, started (it takes over a
    running master without a failed request). supervisor "none": a unit setup
    installed before is disabled and removed. Idempotent; says what it changed."""
    from deployer.master import units

    sd = _Systemd()
    name = units.unit_name_of(layout, app)  # a role's master has a unit of its own
    path = sd.unit_dir / name
    wants = sd.unit_dir / f"{sd.target}.wants" / name
    if supervisor == "none":
        notes: list[str] = []
        removed = _remove_unit(sd, name, path, wants, notes)
        _write_record(layout, {"supervisor": "none"})
        return answers.UnitResult(
            "none", name, sd.scope, None, removed=removed, notes=notes,
            boot=boot_status(layout).why,
        )  # fmt: skip
    if sd.systemctl is None:
        why = "no systemd on this host (no systemctl): the master will not come back after a reboot"
        if supervisor == "systemd":
            raise AgentError(f'[master] supervisor = "systemd": {why}')
        _write_record(layout, {"supervisor": supervisor, "reason": why})
        return answers.UnitResult(supervisor, boot=why)
    cfg = _host_master_config(layout)
    python = sys.executable or shutil.which("python3") or "python3"
    try:
        text = units.installed(layout, app, python, cfg, sd.scope, sd.user, os.environ.get("PATH"))
    except units.UnitError as e:
        raise AgentError(str(e)) from None
    sd.unit_dir.mkdir(parents=True, exist_ok=True)
    written = trust.write_file(path, text.encode())
    notes = []
    enabled_now = False
    if not os.path.lexists(wants):
        ok, out = sd.ctl("enable", name)
        if not ok:
            why = f"systemctl {sd.flag()}enable {name} failed: {out}"
            if supervisor == "systemd":
                raise AgentError(why)
            notes.append(why)
        enabled_now = ok
    linger = None
    if sd.scope == "user":
        # said once, by the setup that installs the unit; status's boot reason keeps it
        fresh = written or enabled_now
        linger = _linger(sd, notes) if fresh else Path(LINGER_DIR, sd.user).exists()
    record = {"supervisor": supervisor, "unit": name, "scope": sd.scope, "path": str(path)}
    record.update(wants=str(wants), user=sd.user, root=sd.root)
    _write_record(layout, record)
    started = None
    if sd.running:
        if written:
            ok, out = sd.ctl("daemon-reload")
            if not ok:
                notes.append(f"systemctl {sd.flag()}daemon-reload failed: {out}")
        if os.path.lexists(wants):
            started = _start_unit(sd, name, layout, cfg, written, notes)
    return answers.UnitResult(
        supervisor, name, sd.scope, str(path), written, False, os.path.lexists(wants),
        enabled_now, sd.running, linger, started, notes, boot_status(layout).why,
    )  # fmt: skip


def _host_master_config(layout: Layout) -> Any:
    from deployer.hostapi.options import ConfigError, build
    from deployer.master.config import load_layout_file

    try:
        return build(load_layout_file(layout.master_config))
    except ConfigError as e:
        raise AgentError(f"the unit runs the master with {layout.master_config}: {e}") from None


def _write_record(layout: Layout, record: dict[str, Any]) -> None:
    trust.write_file(layout.unit_record, (json.dumps(record, sort_keys=True) + "\n").encode())


def _remove_unit(sd: _Systemd, name: str, path: Path, wants: Path, notes: list[str]) -> bool:
    """Disable and delete the unit file, only if setup wrote it."""
    from deployer.master.units import MARK

    try:
        if not path.read_text().startswith(MARK):
            notes.append(f"{path} was not written by deployer setup: left as it is")
            return False
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{path}: {e}: left as it is")
        return False
    if sd.systemctl is not None:
        if sd.running and sd.ctl("is-active", name)[0]:
            notes.append(f"{name} runs the master now: it keeps running until it stops")
        sd.ctl("disable", name)
    with contextlib.suppress(FileNotFoundError):
        wants.unlink()
    path.unlink()
    if sd.systemctl is not None and sd.running:
        sd.ctl("daemon-reload")
    return True


def _linger(sd: _Systemd, notes: list[str]) -> bool:
    """A user unit starts at boot only if the user lingers (logind starts the
    user's systemd at boot); try to turn it on, and say so if we cannot."""
    flag = Path(LINGER_DIR, sd.user)
    if flag.exists():
        return True
    loginctl = shutil.which("loginctl")
    why = "no loginctl"
    if loginctl is not None:
        try:
            r = subprocess.run(
                [loginctl, "enable-linger", sd.user],
                capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            why = " ".join((r.stderr or r.stdout).split())[-300:] or f"exit {r.returncode}"
        except subprocess.TimeoutExpired:
            why = "loginctl: no answer within 15s"
    if flag.exists():
        return True
    notes.append(
        f"lingering is off for {sd.user} (loginctl enable-linger: {why}): the user unit starts"
        f" at {sd.user}'s first login, not at boot; as root: loginctl enable-linger {sd.user}"
    )
    return False


def _start_unit(
    sd: _Systemd, name: str, layout: Layout, cfg: Any, written: bool, notes: list[str]
) -> str | None:
    """systemd runs here: the unit should run the master. A master that `master
    start` daemonized is taken over by the unit's (`master run` hands it over)."""
    if sd.ctl("is-active", name)[0]:
        if written:
            notes.append(f"{name} runs the master; the changed unit applies at its next start")
        return "already running"
    if not layout.current.exists():
        return None  # ConditionPathExists: it starts with the first release's master
    had_master = master_state(layout).running
    bound = cfg.worker_count() * (cfg.ready_timeout + cfg.ready_soak) + cfg.shutdown_timeout
    ok, out = sd.ctl("start", name, timeout=bound + 60)
    if not ok:
        notes.append(f"systemctl {sd.flag()}start {name} failed: {out}")
        return None
    return "took over the running master" if had_master else "started"


def boot_status(layout: Layout) -> answers.BootStatus:
    """Would the master come back after a reboot: the unit setup recorded, checked."""
    record_path = layout.unit_record
    try:
        rec = json.loads(record_path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        why = "no unit installed (`deployer setup`): the master will not come back after a reboot"
        return answers.BootStatus(None, why=why)
    except (OSError, ValueError) as e:
        return answers.BootStatus(None, why=f"{record_path} is unreadable ({e}): `deployer setup`")
    supervisor = str(rec.get("supervisor"))
    if supervisor == "none":
        why = 'supervisor = "none": nothing brings the master back after a reboot'
        return answers.BootStatus("none", why=why)
    name = rec.get("unit")
    if not name:
        return answers.BootStatus(supervisor, why=str(rec.get("reason") or "no unit installed"))
    scope, user = rec.get("scope"), str(rec.get("user") or "")
    path, wants = Path(str(rec.get("path"))), str(rec.get("wants"))
    running = not rec.get("root") and _systemd_booted()
    enabled = path.is_file() and os.path.lexists(wants)
    linger = Path(LINGER_DIR, user).exists() if scope == "user" else None
    flag = "--user " if scope == "user" else ""
    comes_back = False
    if not path.is_file():
        why = f"unit {name} is gone ({path}): the master will not come back after a reboot"
    elif not enabled:
        why = (
            f"unit {name} is not enabled: the master will not come back after a reboot"
            f" (systemctl {flag}enable {name})"
        )
    elif linger is False and running:
        why = (
            f"user unit {name} is enabled but {user} does not linger: it starts at {user}'s"
            f" first login, not at boot (as root: loginctl enable-linger {user})"
        )
    elif (problem := _boot_problem(layout, path)) is not None:
        why = (
            f"unit {name} {problem}: the master will not come back after a reboot"
            " (`deployer setup` rewrites the unit)"
        )
    else:
        comes_back = True
        why = f"{scope} unit {name} enabled"
        if not running:
            why += "; systemd is not running here: it starts the master when the host boots with it"
            if linger is False:
                why += f" and {user} lingers"
    return answers.BootStatus(
        supervisor, name, scope, str(path), enabled, linger, running, comes_back, why
    )


def _boot_problem(layout: Layout, path: Path) -> str | None:
    """What is wrong with what the unit would run at boot for this role's master: its
    ExecStart and conditions must name this role's files, and those must exist."""
    from deployer.master import units

    try:
        text = path.read_text()
        argv = units.exec_start(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"cannot be read ({e})"
    expected = units.boot_argv(layout, argv[0])
    if argv != expected:
        return f"would run `{' '.join(argv[1:])}`, not `{' '.join(expected[1:])}`"
    if units.conditions(text) != units.boot_conditions(layout):
        return f"starts only if {' and '.join(units.conditions(text))} exist"
    if not os.access(argv[0], os.X_OK):
        return f"runs {argv[0]}, which is missing"
    for needed in (layout.pyz, layout.master_config):
        if not needed.is_file():
            return f"runs the master with {needed}, which is missing"
    return None


def lifecycle(layout: Layout, action: str) -> answers.Lifecycle:
    """The host's part of `deployer app stop|start|remove`: the stop mark, which keeps
    the master down through a reboot (its unit's condition), and removing what setup
    wrote for a role (`remove`) or deploy_to itself (`purge`)."""
    mark = layout.stopped
    if action == "stop":
        changed = trust.write_file(mark, b"deployer app stop\n", 0o600)
        return answers.Lifecycle(action, changed)
    if action == "start":
        changed = os.path.lexists(mark)
        with contextlib.suppress(FileNotFoundError):
            mark.unlink()
        return answers.Lifecycle(action, changed)
    if action == "remove":
        removed = []
        for path in (layout.master_config, layout.unit_record, mark, layout.pidfile):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(str(path))
        return answers.Lifecycle(action, bool(removed), removed)
    if action == "purge":
        running = [r for r in layout.master_roles() if master_state(layout.for_role(r)).running]
        if running:
            who = ", ".join("the master" if r is None else f"role {r}'s master" for r in running)
            raise AgentError(f"{layout.root}: {who} still runs: not removed")
        shutil.rmtree(layout.root)
        return answers.Lifecycle(action, True, [str(layout.root)])
    raise AgentError(f"lifecycle: unknown action {action!r}")
