#!/usr/bin/env python3
"""Example queue consumer for a `worker` role (no socket, no HTTP), standard
library only.

- Gets no listening socket (its role has no `listen`): it only "consumes jobs".
- Tells the master it is ready: `READY=1` to $NOTIFY_SOCKET (sd_notify), or to
  the pipe in $DEPLOYER_READY_FD.
- Drains on SIGTERM: the job in hand is finished, then it exits 0; a job is
  never cut in half by a reload.

Each job takes $JOB_SECONDS (default 0.2) and is logged to $JOBS_LOG (when set)
as two lines, `start <pid> <release> <n>` and `end <pid> <release> <n>`, the
release being the one the master started it from ($DEPLOYER_RELEASE), so a test
can tell which release did which job and that none was cut.
"""

from __future__ import annotations

import os
import signal
import socket
import time

stopping = False


def on_term(_signum: int, _frame: object) -> None:
    global stopping
    stopping = True


def ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        if address.startswith("@"):
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(b"READY=1")
    fd = os.environ.get("DEPLOYER_READY_FD")
    if fd:
        os.write(int(fd), b"READY=1\n")
        os.close(int(fd))


def log(path: str | None, line: str) -> None:
    if path:
        with open(path, "a") as f:  # one write of one short line: appends do not interleave
            f.write(line + "\n")


def main() -> int:
    signal.signal(signal.SIGTERM, on_term)
    jobs_log = os.environ.get("JOBS_LOG")
    seconds = float(os.environ.get("JOB_SECONDS", "0.2"))
    release = os.path.basename(os.environ.get("DEPLOYER_RELEASE", os.getcwd()))
    ready()
    n = 0
    while not stopping:
        n += 1
        log(jobs_log, f"start {os.getpid()} {release} {n}")
        time.sleep(seconds)  # the job; a SIGTERM now only sets the flag
        log(jobs_log, f"end {os.getpid()} {release} {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
