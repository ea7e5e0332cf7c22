"""The master's name in `ps`: `deployer master: [ROLE] DEPLOY_TO`, not the
zipapp's bootstrap (`python3 -c import sys ...`) it was started by.

Standard library only: the kernel's name (`ps -o comm`, 15 bytes) by
prctl(PR_SET_NAME); the command line by writing over the process's own argv
memory through /proc/self/mem, as setproctitle(3) does, within its length.
Best effort: a process that cannot be renamed keeps its name and runs on.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

PR_SET_NAME = 15
COMM = b"deployer master"  # the kernel keeps 15 bytes of a name


def title_for(config: str | None) -> str:
    """`deployer master: [web] /srv/shop` from the options file a master runs with
    (master-<role>.toml in deploy_to); without one, the directory it runs in."""
    if not config:
        return f"deployer master: {os.getcwd()}"
    path = os.path.abspath(config)
    stem = os.path.splitext(os.path.basename(path))[0]
    role = f"[{stem[len('master-') :]}] " if stem.startswith("master-") else ""
    return f"deployer master: {role}{os.path.dirname(path)}"


def set_title(title: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, COMM, 0, 0, 0)
    with contextlib.suppress(OSError, ValueError, IndexError):
        _write_argv(title.encode())


def _write_argv(title: bytes) -> None:
    """Our argv area holds `title`, NUL-padded; its last byte not NUL, which tells the
    kernel to read the command line up to the first NUL (see proc(5), cmdline)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48, 49
    size = end - start
    if size < 2:
        return
    text = title[: size - 2]
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(text + b"\0" * (size - len(text) - 1) + b" ")
