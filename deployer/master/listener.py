"""The one listening socket: bound once by the master (or inherited from
systemd socket activation) and shared by every worker as fd 3."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct

from deployer.master.config import ConfigError
from deployer.master.control import check_path

# The kernel caps this at net.core.somaxconn: ask for the deepest queue allowed,
# so connections wait (not get refused) while workers are replaced.
BACKLOG = 65535
SD_LISTEN_FDS_START = 3


def bind(listen: str) -> socket.socket:
    """Bind and listen on HOST:PORT or unix:PATH; a busy address is bad input."""
    if listen.startswith("unix:"):
        return _bind_unix(listen[5:], listen)
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise ConfigError(f"--listen: cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it on Linux: a worker that never sets it (uvicorn
        # handed an fd takes it for a unix socket) is not held up by Nagle's ~40 ms
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--listen: cannot bind {listen}: {e.strerror or e}") from None
    return sock


def _bind_unix(path: str, listen: str) -> socket.socket:
    check_path(path, "--listen")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode) and not _unix_in_use(path):
            os.unlink(path)  # stale socket of a master that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--listen: cannot bind {listen}: {e.strerror or e}") from None
    return sock


def _unix_in_use(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def inherited() -> socket.socket | None:
    """The socket systemd passed us (LISTEN_PID is our pid), or None.

    The LISTEN_* variables are removed so they do not leak into workers with a
    pid that is not theirs; workers get their own (see worker.py).
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count or int(count) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    return sock


# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked,
# sacked. On a listening socket unacked is the accept queue's length and sacked
# its limit (the backlog).
TCP_INFO_HEAD = struct.Struct("8B6I")


def backlog(sock: socket.socket) -> int | None:
    """The accept queue limit of a listening TCP socket (None: not TCP, or unknown)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
        return TCP_INFO_HEAD.unpack(info)[13]
    except (OSError, struct.error):
        return None


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"
