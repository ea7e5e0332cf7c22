"""Releases: state, receive a pack, prepare (extract, link shared, build), switch, prune, record."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deployer.agent.ops.common import AgentError, _git
from deployer.hostapi import answers, trust
from deployer.hostapi.layout import RELEASE_NAME, Layout


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
        masters={r or "": master_state(layout.for_role(r)) for r in layout.master_roles()},
        role_releases=role_releases(layout),
    )


def master_state(layout: Layout) -> answers.MasterState:
    stopped = os.path.lexists(layout.stopped)
    try:
        pid = int(layout.pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return answers.MasterState(running=False, stopped=stopped)
    return answers.MasterState(True, pid, str(layout.socket), stopped)


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


def switch(layout: Layout, release: str, roles: Sequence[str] = ()) -> answers.SwitchResult:
    """Point `current` at a release atomically: a new symlink renamed over the old one;
    record it as the release of `roles` ("": the implicit one)."""
    target = layout.release(release)
    if not target.is_dir():
        raise AgentError(f"release {release} does not exist on this host")
    previous = current_release(layout)
    if roles:
        recorded = role_releases(layout)
        recorded.update(dict.fromkeys(roles, release))
        data = (json.dumps(recorded, sort_keys=True) + "\n").encode()
        trust.write_file(layout.role_releases, data)
    tmp = layout.root / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path("releases") / release)
    os.replace(tmp, layout.current)
    masters = {r: master_state(layout.for_role(r or None)) for r in roles}
    return answers.SwitchResult(previous, release, masters)


def role_releases(layout: Layout) -> dict[str, str]:
    """What each role was last switched to; {} if never recorded (or unreadable: then
    every role's is `current`, as before roles had their own)."""
    try:
        recorded = json.loads(layout.role_releases.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {str(k): str(v) for k, v in recorded.items() if RELEASE_NAME.fullmatch(str(v))}


def prune(layout: Layout, keep: int) -> answers.PruneResult:
    """Remove the oldest releases beyond `keep`; never current, never the one before it."""
    names = releases(layout)
    current = current_release(layout)
    protected = {current, *role_releases(layout).values()}  # a role's workers run it
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


def record(layout: Layout, entry: dict[str, Any]) -> answers.Recorded:
    """Append `entry` to the host's history; the same entry again (a call retried
    after its answer was lost) is not written twice."""
    layout.root.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    with open(layout.history, "a+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - len(line) - 1))
        last = fh.read()
        if not (last.endswith(b"\n" + line) or last == line):
            fh.write(line)
    return answers.Recorded()
