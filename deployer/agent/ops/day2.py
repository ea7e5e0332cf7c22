"""Day-2: the master's log (tail, follow across a rotation), a command in current/."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from deployer.agent.ops.common import AgentError
from deployer.hostapi import answers
from deployer.hostapi.layout import Layout
from deployer.hostapi.workerenv import EnvFileError, dropped_note, read_env_file

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


def app_env(layout: Layout) -> tuple[dict[str, str], str | None]:
    """The app's environment as its workers get it: master.toml's `env`, then the
    `env_file` secrets over it; and a note if the secrets file held reserved names
    (LISTEN_FDS, DEPLOYER_*, ...), left out as the master leaves them out. A message
    names a file, never a value in it."""
    from deployer.hostapi.options import ConfigError
    from deployer.master.config import load_layout_file

    if not os.path.lexists(layout.master_config):
        return {}, None
    try:
        values = load_layout_file(layout.master_config)
    except ConfigError as e:
        raise AgentError(f"{e} (fix it, or `deployer setup` writes it again)") from None
    env = {str(k): str(v) for k, v in (values.get("env") or {}).items()}
    path = values.get("env_file")
    if not path:
        return env, None
    try:
        found = read_env_file(path)
    except EnvFileError as e:
        raise AgentError(str(e)) from None
    env.update(found.values)
    return env, (dropped_note(path, found.dropped) if found.dropped else None)


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
    app, note = app_env(layout)
    env = {**os.environ, **app}
    env.update(DEPLOYER_RELEASE=release, DEPLOYER_ROOT=str(layout.root), PWD=release)
    os.chdir(release)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(1, 2)
    if note:  # in the command's output, where the operator looks
        print(f"deployer: {note}", file=sys.stderr, flush=True)
    for fd in os.listdir("/proc/self/fd"):  # the zipapp's memfd and the like stay here
        if int(fd) > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(int(fd), False)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise AgentError(f"{argv[0]}: {e.strerror or e}") from None
