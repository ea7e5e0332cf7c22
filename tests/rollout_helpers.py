"""Helpers for rollout tests: an app repository, an inventory for the sshd hosts,
and the `deployer` command run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sshd import SSHTestHost, inventory_toml


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
