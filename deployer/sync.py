"""Moving a git revision to a host: only the objects the host lacks.

A host's `repo/` holds the complete trees of the revisions deployed to it
(pinned as refs/deployer/<sha>), not their history. So the pack for a host is
"every object of the new revision's tree, minus every object of the trees the
host already has": the first deploy sends one tree (no history), a one-line
change sends the changed blob and the trees above it. Objects reachable only
through older history are never assumed to be there, so a revert to an old
file version still arrives complete.
"""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from deployer.errors import BadInput, DeployerError


class SyncError(DeployerError):
    pass


@dataclass(frozen=True)
class Revision:
    sha: str
    subject: str

    @property
    def short(self) -> str:
        return self.sha[:7]


class Source:
    """The repository deploys come from (a work tree or a bare repo)."""

    def __init__(self, path: str | Path) -> None:
        import git

        try:
            self.repo = git.Repo(path, search_parent_directories=True)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise BadInput(f"--repo: {path} is not a git repository") from None
        self.git_dir = Path(self.repo.git_dir)
        self._lock = threading.Lock()
        # Hosts that hold the same revisions get the same pack: computed once per
        # rollout, not once per host (8 hosts: 8 `git pack-objects` of the same tree).
        self._packs: dict[tuple[str, frozenset[str]], bytes | None] = {}
        self._pack_locks: dict[tuple[str, frozenset[str]], threading.Lock] = {}

    def resolve(self, rev: str | None) -> Revision:
        """Anything `git rev-parse` accepts, as the commit it names. Resolved by git
        itself: GitPython's own parser raises on specs it cannot handle (`HEAD@{999}`)."""
        spec = "HEAD" if rev is None else rev
        if not spec.strip() or "\0" in spec:
            raise BadInput(f"revision {spec!r}: expected a branch, tag or commit name")
        named = self._rev_parse(spec, spec)
        sha = self._rev_parse(f"{named}^{{commit}}", spec)
        with self._lock:  # GitPython's persistent cat-file process is not thread-safe
            summary = self.repo.commit(sha).summary
        return Revision(sha, summary if isinstance(summary, str) else "")

    def _rev_parse(self, arg: str, spec: str) -> str:
        """The object `arg` names, or BadInput naming the user's `spec` and git's reason."""
        proc = self._git("rev-parse", "--verify", "--end-of-options", arg, check=False)
        if proc.returncode != 0:
            reason = proc.stderr.decode(errors="replace").strip().splitlines()
            why = f" (git: {reason[0].removeprefix('fatal: ')})" if reason else ""
            raise BadInput(f"revision {spec!r} is not a commit in {self.git_dir}{why}")
        return proc.stdout.decode().strip()

    def has_commit(self, sha: str) -> bool:
        return self._git("cat-file", "-e", f"{sha}^{{commit}}", check=False).returncode == 0

    @cache  # noqa: B019 - one Source per rollout; trees of a commit never change
    def tree_objects(self, sha: str) -> frozenset[str]:
        out = self._git("rev-list", "--objects", "--no-walk", sha).stdout.decode()
        return frozenset(line.split(" ", 1)[0] for line in out.splitlines() if line)

    def pack_for(self, sha: str, host_has: list[str]) -> bytes | None:
        """A pack with what a host holding `host_has` lacks for `sha`; None if nothing."""
        haves = frozenset(h for h in host_has if self.has_commit(h))
        key = (sha, haves)
        with self._lock:
            key_lock = self._pack_locks.setdefault(key, threading.Lock())
        with key_lock:  # the other hosts with the same `key` wait for this one, then reuse it
            if key not in self._packs:
                self._packs[key] = self._pack(sha, haves)
            return self._packs[key]

    def _pack(self, sha: str, haves: frozenset[str]) -> bytes | None:
        need = set(self.tree_objects(sha))
        for have in sorted(haves):
            need -= self.tree_objects(have)
        if not need:
            return None
        # Sorted input: the same need gives the same pack bytes.
        return self._git("pack-objects", "--stdout", "-q", stdin="\n".join(sorted(need))).stdout

    def _git(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            ["git", f"--git-dir={self.git_dir}", *args],
            input=None if stdin is None else (stdin + "\n").encode(),
            capture_output=True,
        )
        if check and proc.returncode != 0:
            raise SyncError(f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc


def pack_for_host(source: Source, revision: Revision, have: list[str]) -> bytes | None:
    """What a host holding the revisions `have` must receive for `revision`: None if
    it has it already, else a pack (empty when every object is there, e.g. a
    re-tagged tree: receiving it still pins the revision)."""
    if revision.sha in have:
        return None
    return source.pack_for(revision.sha, have) or b""
