"""The master's log: its own lines and every worker's stdout/stderr, each
line prefixed with a timestamp and who wrote it. SIGUSR1 reopens the file
(the logrotate convention)."""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from typing import Any

MAX_LINE = 64 * 1024  # a "line" without newline longer than this is flushed as is
TAIL_LINES = 20  # stderr lines kept per worker for failure reports


def timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class MasterLog:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd = 2
        self.stderr_captured = False
        self.open()

    def open(self) -> None:
        if self.path is not None:
            self.fd = os.open(
                # O_NOFOLLOW: a symlink planted at the log path must not redirect it
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o640,
            )

    def reopen(self) -> None:
        """Open the path again (logrotate moved the old file away)."""
        if self.path is None:
            return
        old = self.fd
        self.open()
        if self.stderr_captured:
            os.dup2(self.fd, 2)
        os.close(old)
        self.master(f"log reopened: {self.path}")

    def capture_stderr(self) -> None:
        """Daemon mode: our own stderr (tracebacks included) goes to the log too."""
        if self.path is not None:
            os.dup2(self.fd, 2)
            self.stderr_captured = True

    def line(self, who: str, text: str) -> None:
        prefix = f"{timestamp()} [{who}] "
        data = "".join(prefix + part + "\n" for part in text.split("\n")).encode(errors="replace")
        with contextlib.suppress(OSError):  # a full disk must not take the service down
            os.write(self.fd, data)

    def master(self, text: str) -> None:
        self.line(f"master {os.getpid()}", text)


class OutputStream:
    """One worker pipe (stdout or stderr): split into lines, prefix, log.

    Lives until EOF, which may be after the worker exited (a grandchild can
    hold the pipe), so it is not tied to the worker record.
    """

    def __init__(self, fd: int, who: str, log: MasterLog, tail: deque[str] | None) -> None:
        self.fd = fd
        self.who = who
        self.log = log
        self.tail = tail
        self.partial = b""

    def read(self) -> bool:
        """Read what is there; False at EOF (the caller closes and forgets us)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self.flush()
            return False
        *lines, self.partial = (self.partial + data).split(b"\n")
        if len(self.partial) > MAX_LINE:
            lines.append(self.partial)
            self.partial = b""
        for raw in lines:
            self.emit(raw)
        return True

    def to_state(self, stderr_of: int | None) -> dict[str, Any]:
        """As JSON (an upgrade hands it over); stderr_of: the pid whose tail it feeds."""
        return {
            "fd": self.fd,
            "who": self.who,
            "partial": self.partial.decode(errors="replace"),
            "stderr_of": stderr_of,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any], log: MasterLog, tail: deque[str] | None) -> OutputStream:
        stream = cls(d["fd"], d["who"], log, tail)
        stream.partial = d["partial"].encode()
        return stream

    def flush(self) -> None:
        if self.partial:
            self.emit(self.partial)
            self.partial = b""

    def emit(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        self.log.line(self.who, text)
        if self.tail is not None:
            self.tail.append(text)


def new_tail() -> deque[str]:
    return deque(maxlen=TAIL_LINES)
