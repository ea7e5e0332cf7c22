"""Helpers for rollout tests: an app repository, an inventory for the sshd hosts,
and the `deployer` command run as a real process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sshd import SSHTestHost, inventory_toml

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "python-app"
APP = (EXAMPLE / "app.py").read_text()


def master_extra(port: int) -> str:
    """[master], [health] and [rollout] for the example app on `port` of every host."""
    return (
        f'[master]\ncommand = "python3 app.py"\nlisten = "{{address}}:{port}"\nworkers = 2\n'
        'ready = "notify"\nready_soak = 0.3\nshutdown_timeout = 10\nready_timeout = 10\n'
        f'[health]\nurl = "http://{{address}}:{port}/health"\ntimeout = 5\npasses = 2\n'
        "interval = 0.2\n[rollout]\ncanary = 1\nbatch = 1\nwatch = 1\n"
    )


WORKER = (EXAMPLE / "worker.py").read_text()
# host1 runs both roles, host2 only web, host3 only worker
HOST_ROLES = {0: '["web", "worker"]', 1: '["web"]', 2: '["worker"]'}


def roles_extra(port: int) -> str:
    return (
        # what the roles share
        '[master]\nready = "notify"\nready_soak = 0.3\nshutdown_timeout = 10\n'
        "ready_timeout = 10\n"
        "[rollout]\ncanary = 1\nbatch = 1\nwatch = 1\n"
        # web: the HTTP app on a shared socket, health-gated
        f'[roles.web.master]\ncommand = "python3 app.py"\nlisten = "{{address}}:{port}"\n'
        "workers = 2\n"
        f'[roles.web.health]\nurl = "http://{{address}}:{port}/health"\ntimeout = 5\n'
        "passes = 2\ninterval = 0.2\n"
        # worker: queue consumers, no listen, no health
        '[roles.worker.master]\ncommand = ["python3", "worker.py"]\nworkers = 2\n'
        # relative to the release the worker runs in: <deploy_to>/shared/jobs.log
        '[roles.worker.env]\nJOBS_LOG = "../../shared/jobs.log"\nJOB_SECONDS = "0.3"\n'
    )


def with_roles(text: str, hosts: list[SSHTestHost]) -> str:
    for i, h in enumerate(hosts):
        text = text.replace(f"[hosts.{h.name}]\n", f"[hosts.{h.name}]\nroles = {HOST_ROLES[i]}\n")
    return text


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def make_repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    commit(path, files, "v1")
    return path


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@dataclass
class Project:
    """A repo + inventory + state dir, and `deployer` run against them."""

    repo: Path
    inventory: Path
    state: Path
    hosts: list[SSHTestHost]

    def deployer(self, *args: str, check: bool = False, timeout: float = 300):
        env = {**os.environ, "DEPLOYER_STATE_DIR": str(self.state)}
        proc = subprocess.run(
            [sys.executable, "-m", "deployer", "-i", str(self.inventory), *args],
            capture_output=True,
            text=True,
            cwd=self.repo,
            env=env,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"deployer {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def current(self, host: SSHTestHost) -> str | None:
        link = host.root / "current"
        return os.readlink(link).split("/")[-1] if link.is_symlink() else None

    def revision(self, host: SSHTestHost) -> str | None:
        rev = host.root / "current" / "REVISION"
        return rev.read_text().strip() if rev.exists() else None

    def releases(self, host: SSHTestHost) -> list[str]:
        d = host.root / "releases"
        return (
            sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []
        )


def make_project(
    tmp_path: Path,
    hosts: list[SSHTestHost],
    files: dict[str, str],
    app_extra: str = "",
    extra: str = "",
) -> Project:
    repo = make_repo(tmp_path / "app", files)
    deploy_to = f"{hosts[0].root.parent}/{{host}}"
    text = inventory_toml(
        hosts,
        f'[app]\nname = "demo"\ndeploy_to = "{deploy_to}"\n{app_extra}\n{extra}\n',
    )
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(text)
    return Project(repo, inventory, tmp_path / "state", hosts)


def unit_record(host: SSHTestHost, role: str | None = None) -> Path:
    """Where setup records the unit it installed for `role`'s master on the host."""
    from deployer.hostapi.layout import Layout

    return Layout.at(host.root, role).unit_record


def remove_unit(host: SSHTestHost, role: str | None = None) -> None:
    """The test user's home is shared by every test: leave no unit of ours behind."""
    import json

    with contextlib.suppress(OSError, ValueError, KeyError):
        record = json.loads(unit_record(host, role).read_text())
        for key in ("wants", "path"):
            Path(record[key]).unlink(missing_ok=True)


def stop_masters(hosts: list[SSHTestHost]) -> None:
    """End the masters the rollouts started (by the pid in each host's pidfile)."""
    pids = []
    for h in hosts:
        for pidfile in sorted((h.root / "run").glob("master*.pid")):  # a master per role
            pid = int(pidfile.read_text())
            try:
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except ProcessLookupError:
                pass
    end = time.monotonic() + 15
    while pids and time.monotonic() < end:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    for p in pids:
        os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def small_disk(project: Project, host: SSHTestHost) -> Iterator[Path]:
    """A 1 MB tmpfs beside the host's roots, owned by its login user, made the
    project's deploy_to parent for the test (mounting needs root)."""
    import pwd

    disk = host.root.parent / "small-disk"
    disk.mkdir()
    user = pwd.getpwnam(host.user)
    options = f"size=1m,mode=0755,uid={user.pw_uid},gid={user.pw_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], check=True)
    try:
        text = project.inventory.read_text().replace(
            f'deploy_to = "{host.root.parent}/', f'deploy_to = "{disk}/'
        )
        project.inventory.write_text(text)
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@contextlib.contextmanager
def serving(
    tmp_path: Path, hosts: list[SSHTestHost], files: dict[str, str], extra: str
) -> Iterator[Project]:
    """A project set up and rolled out once (its masters serving); the masters are
    stopped by pid when the test ends."""
    p = make_project(tmp_path, hosts, files, extra=extra)
    try:
        p.deployer("setup", check=True)
        p.deployer("rollout", check=True)
        yield p
    finally:
        stop_masters(hosts)
