"""The layout on every host (Capistrano's, which operators know).

<deploy_to>/
  releases/<UTC stamp>-<short sha>/   REVISION file inside
  shared/                             linked into every release
  current -> releases/...             switched atomically
  repo/                               bare git repo: object cache for delta transfer
  run/master.sock, run/master.pid     resident master (run/master-<role>.sock ... per role)
  run/deploy.lock/                    the host's deploy lock (atomic mkdir)
  run/master.stopped                  `deployer app stop`: the master stays down
  log/                                master and worker logs
  history.jsonl                       what was deployed here
  master.toml                         the master's options (written by `deployer setup`;
                                      master-<role>.toml for each role the host runs)
  .deployer/deployer.pyz              the host agent zipapp
  .deployer/unit.json                 the systemd unit setup installed (unit-<role>.json)
  .deployer/role-releases.json        the release each role was last switched to
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
# A role (process type: web, worker...) names files and a systemd unit: kept short and plain.
ROLE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SHA = re.compile(r"[0-9a-f]{7,40}")


def utc_stamp(now: dt.datetime | None = None) -> str:
    return f"{now or dt.datetime.now(dt.timezone.utc):%Y%m%d%H%M%S}"


def release_name(sha: str, now: dt.datetime | None = None) -> str:
    """`<UTC stamp>-<short sha>`: sorts by time, names the commit."""
    if not _SHA.fullmatch(sha):
        raise ValueError(f"not a commit sha: {sha!r}")
    return f"{utc_stamp(now)}-{sha[:7]}"


def check_role(name: str) -> str:
    if not ROLE_NAME.fullmatch(name):
        raise ValueError(
            f"not a role name: {name!r} (lowercase letters, digits, '_' and '-', "
            "starting with a letter, at most 32)"
        )
    return name


class Layout:
    """Paths under one deploy root. A plain class, not a dataclass: every agent call
    imports this, and `dataclasses` (with `inspect`) costs ~5 ms a start.

    `role`: the paths of that role's master (socket, pid, master.toml, log); None is
    the single implicit role of an inventory without [roles], with the plain names."""

    __slots__ = ("root", "role")

    def __init__(self, root: Path, role: str | None = None) -> None:
        self.root = root
        self.role = None if role is None else check_role(role)

    def __repr__(self) -> str:
        return f"Layout(root={self.root!r}, role={self.role!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and (other.root, other.role) == (self.root, self.role)

    def __hash__(self) -> int:
        return hash((self.root, self.role))

    @classmethod
    def at(cls, root: str | os.PathLike[str], role: str | None = None) -> Layout:
        return cls(Path(root), role)

    def for_role(self, role: str | None) -> Layout:
        """The same root, with the paths of `role`'s master."""
        return Layout(self.root, role)

    def _master_file(self, directory: Path, suffix: str) -> Path:
        stem = "master" if self.role is None else f"master-{self.role}"
        return directory / f"{stem}{suffix}"

    def master_roles(self) -> list[str | None]:
        """The roles whose master.toml is on this host (None: the implicit one)."""
        found: list[str | None] = []
        for path in sorted(self.root.glob("master*.toml")):
            stem = path.name[: -len(".toml")]
            if stem == "master":
                found.append(None)
            elif stem.startswith("master-") and ROLE_NAME.fullmatch(stem[7:]):
                found.append(stem[7:])
        return found

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
    def unit_record(self) -> Path:
        """What `deployer setup` installed for this role's master's boot (its unit)."""
        return self.tools / ("unit.json" if self.role is None else f"unit-{self.role}.json")

    @property
    def role_releases(self) -> Path:
        """The release each role was last switched to ({"web": NAME}; "": no roles):
        `rollout --roles R` moves `current` for R only, the others keep theirs."""
        return self.tools / "role-releases.json"

    @property
    def lock(self) -> Path:
        return self.run / "deploy.lock"

    @property
    def socket(self) -> Path:
        return self._master_file(self.run, ".sock")

    @property
    def pidfile(self) -> Path:
        return self._master_file(self.run, ".pid")

    @property
    def stopped(self) -> Path:
        """`deployer app stop` was here: the master stays down, even after a reboot
        (its unit's ConditionPathExists=!), until `deployer app start` or a rollout."""
        return self._master_file(self.run, ".stopped")

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
        return self._master_file(self.root, ".toml")

    @property
    def secrets(self) -> Path:
        """`deployer secrets`: a JSON object, mode 0600, read at each worker's start."""
        return self.shared / ".deployer-secrets.json"

    @property
    def master_log(self) -> Path:
        return self._master_file(self.log, ".log")

    def release(self, name: str) -> Path:
        if not RELEASE_NAME.fullmatch(name):
            raise ValueError(f"not a release name: {name!r} (expected <UTC stamp>-<short sha>)")
        return self.releases / name

    def dirs(self) -> list[Path]:
        return [self.releases, self.shared, self.repo, self.run, self.log, self.tools, self.bin]
