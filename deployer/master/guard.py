"""The guard: kills every worker process group when the master dies.

PR_SET_PDEATHSIG only reaches a worker's first process; a wrapper's children
(`npm start` -> node, `sh -c` -> app) would survive a SIGKILL of the master
and keep the port. So the master forks one small guard that holds the read
end of a pipe and learns each worker group as it is spawned (`+pgid`) and
gone (`-pgid`). EOF on the pipe means the master is gone, however it died:
the guard SIGKILLs the groups it still knows and exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

from deployer.master.worker import CAUGHT_SIGNALS


class Guard:
    def __init__(self, pid: int | None = None, fd: int | None = None) -> None:
        self.pid = pid
        self.fd = fd  # write end; the guard reads the other one

    def start(self, pgids: Iterable[int]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the guard process
            os.close(w)
            _watch(r)
        os.close(r)
        self.pid, self.fd = pid, w
        for pgid in pgids:
            self.add(pgid)

    def add(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def remove(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def _send(self, line: str) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):  # the guard died: it is restarted on reap
                os.write(self.fd, line.encode())

    def close(self) -> None:
        """Master exiting normally: EOF tells the guard to clean up and exit."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _watch(fd: int) -> None:  # pragma: no cover - runs in the guard process
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        for sig in CAUGHT_SIGNALS:
            # Its own group, deaf to terminal signals: only EOF ends it.
            signal.signal(sig, signal.SIG_IGN if sig != signal.SIGCHLD else signal.SIG_DFL)
        os.setpgid(0, 0)
        # Hold nothing of the master's: not the port, not the control socket.
        os.closerange(3, fd)
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        groups: set[int] = set()
        buffer = b""
        while chunk := os.read(fd, 4096):
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                op, pgid = line[:1], int(line[1:])
                (groups.add if op == b"+" else groups.discard)(pgid)
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
    except BaseException:  # noqa: BLE001 - never fall back into the master's code
        code = 1
    os._exit(code)
