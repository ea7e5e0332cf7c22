"""The layout on every host (Capistrano's, which operators know).

<deploy_to>/
  releases/<UTC stamp>-<short sha>/   REVISION file inside
  shared/                             linked into every release
  current -> releases/...             switched atomically
  repo/                               bare git repo: object cache for delta transfer
  run/master.sock, run/master.pid     resident master
  run/deploy.lock/                    the host's deploy lock (atomic mkdir)
  log/                                master and worker logs
  history.jsonl                       what was deployed here
  master.toml                         the master's options (written by `deployer setup`)
  .deployer/deployer.pyz              the host agent zipapp
  bin/deployer                        runs it, for operators: `bin/deployer master status`

The controller builds every host path from this class too (a Layout of the
host's deploy_to), so the two sides cannot disagree on where a thing lives.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

RELEASE_NAME = re.compile(r"\d{14}-[0-9a-f]{7,40}")
_SHA = re.compile(r"[0-9a-f]{7,40}")


def utc_stamp(now: dt.datetime | None = None) -> str:
    return f"{now or dt.datetime.now(dt.timezone.utc):%Y%m%d%H%M%S}"


def release_name(sha: str, now: dt.datetime | None = None) -> str:
    """`<UTC stamp>-<short sha>`: sorts by time, names the commit."""
    if not _SHA.fullmatch(sha):
        raise ValueError(f"not a commit sha: {sha!r}")
    return f"{utc_stamp(now)}-{sha[:7]}"


class Layout:
    """Paths under one deploy root. A plain class, not a dataclass: every agent call
    imports this, and `dataclasses` (with `inspect`) costs ~5 ms a start."""

    __slots__ = ("root",)

    def __init__(self, root: Path) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"Layout(root={self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> Layout:
        return cls(Path(root))

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def lock(self) -> Path:
        return self.run / "deploy.lock"

    @property
    def socket(self) -> Path:
        return self.run / "master.sock"

    @property
    def pidfile(self) -> Path:
        return self.run / "master.pid"

    @property
    def tools(self) -> Path:
        return self.root / ".deployer"

    @property
    def pyz(self) -> Path:
        return self.tools / "deployer.pyz"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def wrapper(self) -> Path:
        """`<deploy_to>/bin/deployer`: the installed zipapp, for operators on the host."""
        return self.bin / "deployer"

    @property
    def master_config(self) -> Path:
        return self.root / "master.toml"

    @property
    def secrets(self) -> Path:
        """`deployer secrets`: a JSON object, mode 0600, read at each worker's start."""
        return self.shared / ".deployer-secrets.json"

    @property
    def master_log(self) -> Path:
        return self.log / "master.log"

    def release(self, name: str) -> Path:
        if not RELEASE_NAME.fullmatch(name):
            raise ValueError(f"not a release name: {name!r} (expected <UTC stamp>-<short sha>)")
        return self.releases / name

    def dirs(self) -> list[Path]:
        return [self.releases, self.shared, self.repo, self.run, self.log, self.tools, self.bin]
