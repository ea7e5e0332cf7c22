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
  .deployer/                          host agent zipapp and master config
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

RELEASE_NAME = re.compile(r"\d{14}-[0-9a-f]{7,40}")


@dataclass(frozen=True)
class Layout:
    root: Path

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
    def master_config(self) -> Path:
        return self.root / "master.toml"

    def release(self, name: str) -> Path:
        if not RELEASE_NAME.fullmatch(name):
            raise ValueError(f"not a release name: {name!r} (expected <UTC stamp>-<short sha>)")
        return self.releases / name

    def dirs(self) -> list[Path]:
        return [self.releases, self.shared, self.repo, self.run, self.log, self.tools]
