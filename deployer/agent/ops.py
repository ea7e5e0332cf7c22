"""Host operations. Each returns its typed answer (hostapi.answers) or raises AgentError.

Standard library only: this runs on the hosts from the zipapp `deployer setup`
uploads. Nothing that serves traffic changes before `switch`: a release is
built under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deployer.hostapi import answers, trust
from deployer.hostapi.layout import RELEASE_NAME, Layout


class AgentError(Exception):
    """An operation failed; the message is for the operator."""


def _git(layout: Layout, *args: str, stdin: Any = None, capture: bool = True) -> str:
    proc = subprocess.run(
        ["git", f"--git-dir={layout.repo}", *args],
        stdin=stdin,
        capture_output=capture,
        text=False,
    )
    if proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip()
        raise AgentError(f"git {' '.join(args[:2])} failed: {err}")
    return (proc.stdout or b"").decode()


# --- layout ---------------------------------------------------------------------------


def setup(
    layout: Layout, install: bool = False, master_toml: str | None = None
) -> answers.SetupResult:
    """Create the layout, or check the one there is; then (the layout being ours
    alone) write the zipapp this runs from, bin/deployer and master.toml. Idempotent."""
    created = trust.secure_dirs(layout.root, layout.dirs(), create=True)
    if not (layout.repo / "HEAD").exists():
        subprocess.run(["git", "init", "-q", "--bare", str(layout.repo)], check=True)
    installed = install and trust.write_file(layout.pyz, _own_zipapp())
    if install:
        trust.write_file(layout.wrapper, wrapper_script(layout, sys.executable), 0o755)
    changes = [] if master_toml is None else _config_changes(layout, master_toml)
    changed = master_toml is not None and trust.write_file(
        layout.master_config, master_toml.encode()
    )
    return answers.SetupResult(
        str(layout.root),
        [str(d) for d in layout.dirs()],
        [str(d) for d in created],
        installed,
        changed,
        changes,
    )


def _config_changes(layout: Layout, new_text: str) -> list[str]:
    """`key: old -> new` for each master option master.toml is about to change."""
    from deployer.hostapi.options import ConfigError, toml_value
    from deployer.master.config import load_text

    path = str(layout.master_config)
    try:
        old = load_text(layout.master_config.read_text(), path)
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ConfigError):
        old = {}  # unreadable: every key counts as changed
    new = load_text(new_text, path)

    def shown(value: Any) -> str:
        return "unset" if value is None else toml_value(value)

    return [
        f"{key}: {shown(old.get(key))} -> {shown(new.get(key))}"
        for key in dict.fromkeys([*old, *new])
        if old.get(key) != new.get(key)
    ]


WRAPPER = """\
#!/bin/sh
# Written by `deployer setup`: the host agent installed in this deploy_to, run
# by the Python that set it up (not sha256-checked like the controller's calls:
# only the deploy user can write it). `bin/deployer master status|reload|scale|
# stop|upgrade` find the master's socket in master.toml (--socket wins).
py={python}
pyz={pyz}
config={config}
if [ "$1" = master ] && [ -f "$config" ]; then
  case "$2" in
    status|reload|scale|stop|upgrade)
      command=$2
      shift 2
      exec "$py" "$pyz" master "$command" --config "$config" "$@"
      ;;
  esac
fi
exec "$py" "$pyz" "$@"
"""


def wrapper_script(layout: Layout, python: str) -> bytes:
    """`<deploy_to>/bin/deployer`: the installed zipapp for an operator on the host."""
    import shlex

    quoted = {  # no path in a comment: a newline in it would end the comment
        "python": shlex.quote(python or "python3"),
        "pyz": shlex.quote(str(layout.pyz)),
        "config": shlex.quote(str(layout.master_config)),
    }
    return WRAPPER.format(**quoted).encode()


def _own_zipapp() -> bytes:
    """The bytes of the zipapp this code was imported from (the bootstrap's copy)."""
    import deployer

    root = os.path.dirname(os.path.dirname(os.path.abspath(deployer.__file__)))
    if not os.path.isfile(root):
        raise AgentError(f"--install: not running from a zipapp ({root})")
    with open(root, "rb") as f:
        return f.read()


# --- boot persistence: the app's systemd unit ----------------------------------------

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


def _unit_record(layout: Layout) -> Path:
    return layout.tools / "unit.json"


def unit(layout: Layout, app: str, supervisor: str) -> answers.UnitResult:
    """The app's systemd unit (`deployer setup`): installed and enabled, so that a
    reboot brings the master back; where systemd runs, started (it takes over a
    running master without a failed request). supervisor "none": a unit setup
    installed before is disabled and removed. Idempotent; says what it changed."""
    from deployer.master import units

    sd = _Systemd()
    name = units.app_unit_name(app, str(layout.root))
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
        text = units.installed(
            app, str(layout.root), python, cfg, sd.scope, sd.user, os.environ.get("PATH")
        )
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
    linger = _linger(sd, notes) if sd.scope == "user" else None
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
    from deployer.master.config import load_file

    try:
        return build(load_file(str(layout.master_config)))
    except ConfigError as e:
        raise AgentError(f"the unit runs the master with {layout.master_config}: {e}") from None


def _write_record(layout: Layout, record: dict[str, Any]) -> None:
    trust.write_file(_unit_record(layout), (json.dumps(record, sort_keys=True) + "\n").encode())


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
    record_path = _unit_record(layout)
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


def check_layout(layout: Layout) -> None:
    """Every operation first: deploy_to and its directories are ours alone."""
    trust.secure_dirs(layout.root, layout.dirs(), create=False)


def releases(layout: Layout) -> list[str]:
    if not layout.releases.is_dir():
        return []
    return sorted(p.name for p in layout.releases.iterdir() if RELEASE_NAME.fullmatch(p.name))


def current_release(layout: Layout) -> str | None:
    try:
        target = os.readlink(layout.current)
    except (FileNotFoundError, OSError):
        return None
    return Path(target).name


def _revision(layout: Layout, name: str) -> str | None:
    try:
        return (layout.releases / name / "REVISION").read_text().strip()
    except OSError:
        return None


def have(layout: Layout) -> list[str]:
    """Commits the host's object cache holds (the ones deploys sent it)."""
    if not (layout.repo / "HEAD").exists():
        return []
    out = _git(layout, "for-each-ref", "--format=%(objectname)", "refs/deployer/")
    return sorted(set(out.split()))


def state(layout: Layout) -> answers.HostState:
    names = releases(layout)
    current = current_release(layout)
    previous = None
    if current in names:
        i = names.index(current)
        previous = names[i - 1] if i > 0 else None
    return answers.HostState(
        root=str(layout.root),
        exists=layout.root.is_dir(),
        current=current,
        current_revision=_revision(layout, current) if current else None,
        previous=previous,
        releases=[answers.ReleaseInfo(n, _revision(layout, n)) for n in names],
        have=have(layout),
        master=master_state(layout),
        cpus=os.cpu_count(),
    )


def master_state(layout: Layout) -> answers.MasterState:
    try:
        pid = int(layout.pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return answers.MasterState(running=False)
    return answers.MasterState(running=True, pid=pid, socket=str(layout.socket))


# --- code -----------------------------------------------------------------------------


def receive(layout: Layout, revisions: list[str]) -> dict[str, Any]:
    """Index a pack from stdin into repo/ and pin the revisions it completes.

    The revisions arrive without their history, so each is recorded in
    repo/shallow: git then treats it as a root and never looks for its parents.
    """
    data = sys.stdin.buffer
    first = data.read(65536)
    received = len(first)
    pack = ""
    if first:
        proc = subprocess.Popen(
            ["git", f"--git-dir={layout.repo}", "index-pack", "--stdin", "--fix-thin"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None
        chunk = first
        try:
            while chunk:
                proc.stdin.write(chunk)
                chunk = data.read(65536)
                received += len(chunk)
        except BrokenPipeError:
            pass  # index-pack gave up (a full disk?): its own words say why, below
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise AgentError(f"git index-pack failed: {err.decode(errors='replace').strip()}")
        pack = out.decode().strip()
    shallow = layout.repo / "shallow"
    known = set(shallow.read_text().split()) if shallow.exists() else set()
    with open(shallow, "a") as fh:
        for rev in revisions:
            if rev not in known:
                fh.write(rev + "\n")
    for rev in revisions:
        _git(layout, "update-ref", f"refs/deployer/{rev}", rev)
    return {"bytes": received, "pack": pack}


def prepare(
    layout: Layout, revision: str, release: str, shared: list[str], build: str | None
) -> answers.PrepareResult:
    """Create releases/<release> from a revision, link shared paths, run the build."""
    final = layout.release(release)
    if final.exists():
        if release == current_release(layout):
            raise AgentError(f"release {release} is current; refusing to rebuild it in place")
        shutil.rmtree(final)
    work = layout.releases / f".tmp-{release}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _extract(layout, revision, work)
        (work / "REVISION").write_text(revision + "\n")
        _link_shared(layout, work, shared)
        started = time.monotonic()
        if build:
            _build(work, build, layout)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return answers.PrepareResult(release, str(final), time.monotonic() - started)


def receive_and_prepare(
    layout: Layout,
    receive_pack: bool,
    revision: str,
    release: str,
    shared: list[str],
    build: str | None,
) -> answers.PrepareResult:
    """receive (the pack on stdin, if any) and prepare in one call: one python start
    and SSH round trip less; a full disk is said as such, with the space there is."""
    try:
        received = receive(layout, [revision]) if receive_pack else {}
        return prepare(layout, revision, release, shared, build)._replace(**received)
    except (AgentError, OSError) as e:
        full = _disk_full(layout, e)
        if full is None:
            raise
        raise AgentError(f"{full}; {e}") from None


def _disk_full(layout: Layout, error: BaseException) -> str | None:
    """ "No space left on device", with the space there is, when that is what an
    error was about (tar says "Wrote only 2560 of 10240 bytes", git "unable to write")."""
    text = str(error)
    hints = ("No space left", "Wrote only", "Disk quota exceeded", "unable to write")
    try:
        du = shutil.disk_usage(layout.root)
    except OSError:
        du = None
    nearly_full = du is not None and du.free < 4 * 1024 * 1024
    said = getattr(error, "errno", None) in (28, 122) or any(h in text for h in hints)
    if not (said or nearly_full):
        return None
    if du is None:
        return "no space left on device"
    mb = 1024 * 1024
    return (
        f"no space left on device under {layout.root}: {du.free / mb:.1f} MB free "
        f"of {du.total / mb:.1f} MB"
    )


def _extract(layout: Layout, revision: str, dest: Path) -> None:
    """`git archive | tar -x`: the archive is git's own (export-ignore and export-subst
    apply), the extraction native: python's tarfile took ~3x the user CPU, a large part
    of a redeploy's prepare when many hosts prepare at once. tar refuses absolute and
    `..` member names by default; files belong to the deploy user."""
    archive = subprocess.Popen(
        ["git", f"--git-dir={layout.repo}", "archive", "--format=tar", revision],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert archive.stdout is not None
    tar = subprocess.run(
        ["tar", "-x", "--no-same-owner", "-C", str(dest)],
        stdin=archive.stdout,
        capture_output=True,
    )
    archive.stdout.close()
    err = archive.stderr.read().decode(errors="replace") if archive.stderr else ""
    archive.wait()
    if tar.returncode != 0:  # first: a tar that stopped reading also fails git archive
        why = tar.stderr.decode(errors="replace").strip()
        raise AgentError(f"could not extract {revision}: tar exited {tar.returncode}: {why}")
    if archive.returncode != 0:
        raise AgentError(f"git archive {revision} failed: {err.strip()}")


def _link_shared(layout: Layout, release: Path, shared: list[str]) -> None:
    """Each shared path becomes a symlink into shared/. "dir/" is a directory (created
    if missing); a file must already exist in shared/ (it holds config or secrets that
    a deploy must not invent)."""
    for entry in shared:
        rel = entry.rstrip("/")
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise AgentError(f"[app] shared: {entry!r} is not a relative path inside the release")
        source = layout.shared / rel
        if entry.endswith("/"):
            source.mkdir(parents=True, exist_ok=True)
        elif not source.exists():
            raise AgentError(
                f"[app] shared: {source} does not exist on this host; create it "
                f"(it is linked into every release as {rel})"
            )
        target = _in_release(release, rel, entry)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)


def _in_release(release: Path, rel: str, entry: str) -> Path:
    """release/rel, refusing a path through a symlink the repository committed
    (`conf -> /etc`): linking it would replace or delete files outside the release."""
    here = release
    for part in Path(rel).parts[:-1]:
        here = here / part
        if here.is_symlink():
            raise AgentError(
                f"[app] shared {entry!r}: {here.relative_to(release)} is a symlink in the "
                f"repository (to {os.readlink(here)}); a shared path must not pass through one"
            )
    return release / rel


def _build(release: Path, command: str, layout: Layout) -> None:
    """Run the build in the release, streaming its output to our stdout."""
    env = {**os.environ, "DEPLOYER_RELEASE": str(release), "DEPLOYER_ROOT": str(layout.root)}
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        cwd=release,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    # at most 64 KiB a line: a build printing one endless line must not fill our memory
    for raw in iter(lambda: proc.stdout.readline(65536), b""):  # type: ignore[union-attr]
        line = raw.decode(errors="replace").rstrip("\n")
        print(f"build: {line}", flush=True)
        tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise AgentError(
            f"build `{command}` exited with {proc.returncode}; last lines:\n" + "\n".join(tail)
        )


def switch(layout: Layout, release: str) -> answers.SwitchResult:
    """Point `current` at a release atomically: a new symlink renamed over the old one."""
    target = layout.release(release)
    if not target.is_dir():
        raise AgentError(f"release {release} does not exist on this host")
    previous = current_release(layout)
    tmp = layout.root / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path("releases") / release)
    os.replace(tmp, layout.current)
    return answers.SwitchResult(previous, release)


def prune(layout: Layout, keep: int) -> answers.PruneResult:
    """Remove the oldest releases beyond `keep`; never current, never the one before it."""
    names = releases(layout)
    current = current_release(layout)
    protected = {current}
    if current in names and names.index(current) > 0:
        protected.add(names[names.index(current) - 1])
    removable = [n for n in names if n not in protected]
    excess = max(0, len(names) - keep)
    removed = removable[:excess]
    for name in removed:
        shutil.rmtree(layout.releases / name)
    for leftover in layout.releases.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return answers.PruneResult(removed, [n for n in names if n not in removed])


# --- health ---------------------------------------------------------------------------


class _Deadline(Exception):
    """The wall-clock deadline of an operation passed (SIGALRM)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise _Deadline in the middle of whatever blocks when `seconds` have passed: a
    server trickling one byte a second never times out a socket read."""

    def expire(signum: int, frame: object) -> None:
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def health(
    url: str, expect: int, timeout: float, passes: int, interval: float
) -> answers.HealthResult:
    """Probe until `passes` answers in a row have status `expect`, within `timeout`
    of wall-clock time, whatever the server does."""
    end = time.monotonic() + timeout
    streak, probes, last = 0, 0, "no answer yet"
    try:
        with deadline(timeout):
            while True:
                probes += 1
                status, last = _probe(url, min(5.0, max(0.5, end - time.monotonic())))
                streak = streak + 1 if status == expect else 0
                if streak >= passes:
                    return answers.HealthResult(url, probes, status)
                if time.monotonic() + interval > end:
                    break
                time.sleep(interval)
    except _Deadline:
        last += f" (the deadline passed during probe {probes})"
    raise AgentError(
        f"health check {url} failed: wanted {passes} x {expect} in a row within "
        f"{timeout:g}s; {probes} probes, last answer: {last}"
    )


def _probe(url: str, timeout: float) -> tuple[int | None, str]:
    import urllib.error  # here, not at the top: ~30 ms that only health needs
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, f"{resp.status}"
    except urllib.error.HTTPError as e:
        return e.code, f"{e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None, f"no answer ({reason})"


def status(
    layout: Layout,
    socket: str | None,
    url: str | None,
    expect: int,
    timeout: float,
    window: float,
) -> answers.HostStatus:
    """Everything `deployer status` shows of a host, within `timeout` in all."""
    begun = time.monotonic()
    host = state(layout)
    master, why = None, None
    if socket and host.master.running:
        try:
            with deadline(max(0.5, timeout / 2)):
                master = _master_summary(socket, window)
        except (AgentError, _Deadline) as e:
            why = str(e) or f"no answer on {socket}"
    health = None
    if url and host.current:
        left = max(0.5, timeout - (time.monotonic() - begun) - 0.5)
        try:
            with deadline(left):
                code, last = _probe(url, left)
            health = "ok" if code == expect else f"{url}: wanted {expect}, got {last}"
        except _Deadline:
            health = f"{url}: no complete answer within {left:.1f}s"
    owner = _read_owner(layout.lock / "owner.json")
    return answers.HostStatus(host, master, why, owner, health, boot_status(layout))


def _master_summary(socket: str, window: float) -> answers.MasterSummary:
    s = _master_status(socket)
    since = time.time() - window
    crashes = [c for c in s.get("recent_crashes", []) if c.get("at", 0) >= since]
    last = crashes[-1] if crashes else None
    release = s.get("release")
    return answers.MasterSummary(
        pid=s.get("pid", 0),
        state=s.get("state", "?"),
        release=os.path.basename(release) if release else None,
        ready=s.get("ready", 0),
        configured=s.get("configured", 0),
        recent_crashes=len(crashes),
        last_crash=None if last is None else f"{last.get('when')} ({last.get('how')})",
        crash_loops=len(s.get("crash_loops", [])),
    )


def _master_status(socket: str) -> dict[str, Any]:
    from deployer.master.control import ControlError, request  # only these ops need it

    try:
        answer = list(request(socket, {"cmd": "status"}, 10.0))[-1]
    except (ControlError, TimeoutError, OSError, IndexError) as e:
        raise AgentError(f"the master does not answer on {socket}: {e}") from None
    return answer.get("status") or {}


def secrets(layout: Layout, action: str, key: str | None) -> answers.Secrets:
    """The host's secrets: a JSON object in shared/, mode 0600, that the master reads
    at each worker's start. `set` reads the value from stdin; no value is ever
    printed, answered or put in a message."""
    path = layout.secrets
    try:
        with open(path) as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError
    except FileNotFoundError:
        values = {}
    except ValueError:
        raise AgentError(f"{path} is not a JSON object: fix or remove it") from None
    changed = False
    if action in ("set", "unset"):
        if not key or not _ENV_NAME.fullmatch(key):
            raise AgentError(f"secrets {action}: {key!r} is not a variable name")
        if action == "set":
            value = sys.stdin.read()
            value = value[:-1] if value.endswith("\n") else value
            if "\0" in value:
                raise AgentError(f"secrets set {key}: the value has a NUL byte")
            changed = values.get(key) != value
            values[key] = value
        else:
            changed = values.pop(key, None) is not None
        if changed:
            trust.write_file(path, json.dumps(values, sort_keys=True).encode(), 0o600)
    return answers.Secrets(sorted(values), changed)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
WATCH_POLL = 0.5


def watch(seconds: float, socket: str | None, url: str | None, expect: int) -> answers.WatchResult:
    """Fail at the first sign that the release does not hold up after its switch:
    a worker crash the master reports (a crash loop that starts after ready), a
    worker not ready, a health probe that does not answer `expect`."""
    started, begun = time.time(), time.monotonic()
    polls = probes = 0
    while True:
        if socket:
            _check_master(socket, started)
            polls += 1
        if url:
            try:
                with deadline(5.0):  # a probe that hangs is a failing probe
                    status, last = _probe(url, 5.0)
            except _Deadline:
                status, last = None, "no complete answer within 5s"
            probes += 1
            if status != expect:
                raise AgentError(
                    f"health check {url} failed {time.monotonic() - begun:.1f}s into the "
                    f"watch: wanted {expect}, got {last}"
                )
        left = seconds - (time.monotonic() - begun)
        if left <= 0:
            return answers.WatchResult(seconds, polls, probes)
        time.sleep(min(WATCH_POLL, left))


def _check_master(socket: str, since: float) -> None:
    status = _master_status(socket)
    crashes = [c for c in status.get("recent_crashes", []) if c.get("at", 0) >= since]
    if crashes:
        c = crashes[0]
        raise AgentError(
            f"worker {c.get('worker')} (pid {c.get('pid')}) crashed {c['at'] - since:.1f}s "
            f"into the watch ({c.get('how')}); {len(crashes)} crash(es) in all"
        )
    if status.get("ready", 0) < status.get("configured", 0):
        raise AgentError(
            f"{status.get('ready')} of {status.get('configured')} workers ready "
            f"(master state {status.get('state')})"
        )


# --- history and lock -----------------------------------------------------------------


def record(layout: Layout, entry: dict[str, Any]) -> answers.Recorded:
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.history, "a") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
    return answers.Recorded()


def lock(
    layout: Layout,
    action: str,
    owner: answers.LockOwner,
    force: bool = False,
    take_stale: float | None = None,
    replace: str | None = None,
) -> answers.LockAnswer:
    """The host's deploy lock: a directory, because mkdir is atomic. Acquire also
    takes over a lock whose holder is gone: whose heartbeat is older than
    `take_stale` seconds, or held by `replace` (an id the controller knows is dead);
    the answer then names the holder it replaced."""
    info = layout.lock / "owner.json"
    if action == "acquire":
        layout.run.mkdir(parents=True, exist_ok=True)
        replaced = None
        try:
            layout.lock.mkdir()
        except FileExistsError:
            holder = _read_owner(info)
            gone = replace is not None and holder is not None and holder.id == replace
            if not gone and (take_stale is None or not _stale(layout, holder, take_stale)):
                return answers.LockAnswer(False, holder)
            if not _take_over(layout, holder):
                return answers.LockAnswer(False, _read_owner(info))
            replaced = holder
        info.write_text(json.dumps(owner.to_json()))
        return answers.LockAnswer(True, replaced)
    holder = _read_owner(info)
    mine = holder is not None and holder.id == owner.id
    if action == "heartbeat":
        if mine:
            os.utime(info)
        return answers.LockAnswer(mine, holder)
    if action == "release":
        if mine or (force and holder is not None):
            shutil.rmtree(layout.lock, ignore_errors=True)
            return answers.LockAnswer(True, holder)
        return answers.LockAnswer(False, holder)
    if action == "show":
        return answers.LockAnswer(False, holder)
    raise AgentError(f"unknown lock action {action!r}")


def _stale(layout: Layout, holder: answers.LockOwner | None, after: float) -> bool:
    beat = holder.heartbeat if holder is not None else None
    if beat is None:  # no readable owner file: the directory's own age
        try:
            beat = layout.lock.stat().st_mtime
        except OSError:
            return False
    return time.time() - beat > after


def _take_over(layout: Layout, stale: answers.LockOwner | None) -> bool:
    """Move the stale lock aside and take the place: mkdir decides between racers.
    If what was moved is not the stale lock (another taker was faster), put it back."""
    aside = layout.run / f".deploy.lock.stale-{os.getpid()}"
    try:
        os.rename(layout.lock, aside)
    except OSError:
        return False
    moved = _read_owner(aside / "owner.json")
    if stale is not None and moved is not None and moved.id != stale.id:
        with contextlib.suppress(OSError):
            os.rename(aside, layout.lock)
        return False
    shutil.rmtree(aside, ignore_errors=True)
    try:
        layout.lock.mkdir()
    except FileExistsError:
        return False
    return True


def _read_owner(path: Path) -> answers.LockOwner | None:
    """The holder; None if the lock is not held; one of unknown identity if its
    owner file is unreadable (a crash between mkdir and the write)."""
    if not path.parent.is_dir():
        return None
    try:
        holder = answers.LockOwner.from_json(json.loads(path.read_text()))
        return (holder or answers.LockOwner(""))._replace(heartbeat=path.stat().st_mtime)
    except (OSError, ValueError, TypeError):
        return answers.LockOwner("")


# --- day-2: the log, a command in current/ -----------------------------------------------

_LOG_STAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) ")  # master.log.timestamp()
LOG_BLOCK = 1 << 16
LOG_MAX_LINE = 1 << 16  # a "line" without end longer than this goes out as it is
LOG_ALIVE_S = 30.0  # follow: a keepalive this often when nothing is new (a dead peer ends us)
LOG_DRAIN_S = 10.0  # follow: a log moved away is still read this long (its writer reopens late)


def _stamp(line: bytes) -> bytes | None:
    m = _LOG_STAMP.match(line)
    return m.group(1) if m else None


def _backlog(f: Any, end: int, lines: int | None, since: bytes | None) -> list[bytes]:
    """The last `lines` lines before byte `end` (None: no limit), only those stamped at
    or after `since` (an unstamped line goes with the stamped one above it). Read
    backwards, block by block, only as far as those lines need."""
    pos, buf, newlines = end, b"", 0
    while pos > 0:
        step = min(LOG_BLOCK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        buf = block + buf
        newlines += block.count(b"\n")
        first = buf.find(b"\n")
        stamp = None if first == -1 else _stamp(buf[first + 1 : first + 40])
        # with `since`, the window starts at a stamped line: it says whether what
        # follows it (unstamped) is in
        if lines is not None and newlines > lines + 1 and (since is None or stamp is not None):
            break
        if since is not None and stamp is not None and stamp < since:
            break
    if pos > 0:
        buf = buf[buf.find(b"\n") + 1 :]  # the part of a line the blocks cut
    out = buf.split(b"\n")
    if out and out[-1] == b"":
        out.pop()
    if since is not None:
        kept, keep = [], False
        for line in out:
            stamp = _stamp(line)
            keep = keep if stamp is None else stamp >= since
            if keep:
                kept.append(line)
        out = kept
    if lines is not None:
        out = out[max(0, len(out) - lines) :]
    return out


def _complete_end(f: Any, size: int) -> int:
    """Where the last complete line of the file ends (a line still being written
    is followed, not shown half)."""
    start = max(0, size - LOG_BLOCK)
    f.seek(start)
    tail = f.read(size - start)
    cut = tail.rfind(b"\n")
    return size if cut == -1 else start + cut + 1


class _Tail:
    """One open log file being followed."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.partial = b""
        self.until: float | None = None  # moved away: read until then, then closed

    def read(self, emit: Any) -> bool:
        wrote = False
        while True:
            data = self.f.read(1 << 20)
            if not data:
                return wrote
            *lines, self.partial = (self.partial + data).split(b"\n")
            if len(self.partial) > LOG_MAX_LINE:
                lines.append(self.partial)
                self.partial = b""
            for line in lines:
                emit(line)
            wrote = wrote or bool(lines)

    def close(self, emit: Any) -> None:
        self.read(emit)
        if self.partial:
            emit(self.partial)
        self.f.close()


def _open_log(path: Path) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _stdin_closed(wait: float) -> bool:
    """Wait up to `wait` seconds; True once stdin is at its end (the caller is gone)."""
    import select

    fd = sys.stdin.fileno()
    ready, _, _ = select.select([fd], [], [], wait)
    return bool(ready) and not os.read(fd, 4096)


def logs(
    layout: Layout, lines: int | None, since: str | None, follow: bool, poll: float = 0.25
) -> answers.LogsResult:
    """log/master.log as lines `|<line>` on stdout: the last `lines` (stamped at or
    after `since`); `follow`: then `LOG_LIVE`, and new lines as they are written,
    by name, like `tail -F`: when the log is moved away (SIGUSR1 rotation) the new
    one at the path is followed, and the old one still read for a while. A follow
    ends when stdin does, which the caller closes (or its connection, gone)."""
    from deployer.hostapi.calls import LOG_LINE, LOG_LIVE

    path = layout.master_log
    out = sys.stdout
    count = 0
    since_b = since.encode() if since else None

    def emit(raw: bytes) -> None:
        nonlocal count
        out.write(LOG_LINE + raw.decode("utf-8", "replace").rstrip("\r") + "\n")
        count += 1

    f = _open_log(path)
    try:
        end = 0
        if f is not None:
            size = os.fstat(f.fileno()).st_size
            end = _complete_end(f, size) if follow else size
            for line in _backlog(f, end, lines, since_b):
                emit(line)
        if not follow:
            out.flush()
            return answers.LogsResult(str(path), f is not None, count)
        out.write(LOG_LIVE + "\n")
        out.flush()
        reopened = _follow(path, f, end, emit, poll, out)
        return answers.LogsResult(str(path), path.exists(), count, reopened)
    except BrokenPipeError:  # the caller went away: nobody to answer
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return answers.LogsResult(str(path), path.exists(), count)
    finally:
        if f is not None and not f.closed:
            f.close()


def _follow(path: Path, f: Any, start: int, emit: Any, poll: float, out: Any) -> int:
    tails: list[_Tail] = []
    current = None
    if f is not None:
        f.seek(start)
        current = _Tail(f)
        tails.append(current)
    reopened = 0
    quiet_since = time.monotonic()
    try:
        while not _stdin_closed(poll):
            now = time.monotonic()
            wrote = False
            for t in tails:
                wrote = t.read(emit) or wrote
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (current is None or (st.st_dev, st.st_ino) != _ino(current.f)):
                new = _open_log(path)
                if new is not None:
                    if current is not None:
                        current.until = now + LOG_DRAIN_S
                        reopened += 1
                    current = _Tail(new)
                    tails.append(current)
                    wrote = current.read(emit) or wrote
            elif current is not None and st is not None and st.st_size < current.f.tell():
                current.f.seek(0)  # truncated in place (logrotate's copytruncate)
                current.partial = b""
            for t in [t for t in tails if t.until is not None and now > t.until]:
                t.close(emit)
                tails.remove(t)
                wrote = True
            if wrote:
                out.flush()
                quiet_since = now
            elif now - quiet_since > LOG_ALIVE_S:
                from deployer.hostapi.calls import LOG_ALIVE

                out.write(LOG_ALIVE + "\n")
                out.flush()
                quiet_since = now
        for t in tails:
            t.close(emit)
        out.flush()
    finally:
        for t in tails:
            if not t.f.closed:
                t.f.close()
    return reopened


def _ino(f: Any) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_dev, st.st_ino


def app_env(layout: Layout) -> dict[str, str]:
    """The app's environment as its workers get it: master.toml's `env`, then the
    `env_file` secrets over it. A message names a file, never a value in it."""
    from deployer.hostapi.options import ConfigError
    from deployer.master.config import load_file

    if not layout.master_config.exists():
        return {}
    try:
        values = load_file(str(layout.master_config))
    except ConfigError as e:
        raise AgentError(f"{e} (fix it, or `deployer setup` writes it again)") from None
    env = {str(k): str(v) for k, v in (values.get("env") or {}).items()}
    path = values.get("env_file")
    if not path:
        return env
    try:
        with open(path) as fh:
            secrets = json.load(fh)
    except FileNotFoundError:
        return env
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else "not valid JSON"
        raise AgentError(f"env_file {path}: {why}") from None
    if not isinstance(secrets, dict):
        raise AgentError(f"env_file {path}: not a JSON object")
    env.update({str(k): str(v) for k, v in secrets.items()})
    return env


def exec_in_current(layout: Layout, argv: Any) -> None:
    """Become `argv`, run in the release current/ points to, with the app's
    environment (app_env) over this session's, stderr into stdout. Returns only by
    raising AgentError (nothing ran)."""
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise AgentError("exec: expected the command as a non-empty JSON list of strings")
    if not layout.current.is_symlink():
        raise AgentError(f"no release yet at {layout.current}: nothing to run in (deploy first)")
    release = os.path.realpath(layout.current)
    if not os.path.isdir(release):
        raise AgentError(f"{layout.current} points to {release}, which is not there")
    env = {**os.environ, **app_env(layout)}
    env.update(DEPLOYER_RELEASE=release, DEPLOYER_ROOT=str(layout.root), PWD=release)
    os.chdir(release)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(1, 2)
    for fd in os.listdir("/proc/self/fd"):  # the zipapp's memfd and the like stay here
        if int(fd) > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(int(fd), False)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise AgentError(f"{argv[0]}: {e.strerror or e}") from None
