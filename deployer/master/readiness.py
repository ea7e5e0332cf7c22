"""Readiness: how a worker tells the master it accepts requests.

notify  the sd_notify protocol: the worker sends the datagram `READY=1` to
        $NOTIFY_SOCKET, a datagram socket the master owns. The kernel stamps
        the sender's pid (SO_PASSCRED), so a grandchild (gunicorn's arbiter
        under `sh -c`) counts for the worker whose process group it is in.
pipe    the worker writes `READY=1\\n` to the fd named by $DEPLOYER_READY_FD
        (for runtimes without unix datagram sockets, like Node).
delay   ready after S seconds alive (no proof; for apps that cannot tell).

The same datagram format is what the master itself sends to systemd when it
runs under a Type=notify(-reload) unit (SystemdNotifier).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
from dataclasses import dataclass

CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
READY_FD_ENV = "DEPLOYER_READY_FD"


def how_to_signal(mode: str) -> str:
    """What a worker in `mode` must do to be ready: said when one never was."""
    if mode == "notify":
        return 'it must send READY=1 to the datagram socket in $NOTIFY_SOCKET (ready = "notify")'
    if mode == "pipe":
        return f'it must write READY=1 to the pipe whose fd is in ${READY_FD_ENV} (ready = "pipe")'
    return f'ready = "{mode}"'


@dataclass
class Notification:
    pid: int
    uid: int
    fields: dict[str, str]

    @property
    def ready(self) -> bool:
        return self.fields.get("READY") == "1"


def parse_fields(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def socket_address(name: str) -> str | bytes:
    """$NOTIFY_SOCKET syntax: a leading @ means the abstract namespace."""
    return "\0" + name[1:] if name.startswith("@") else name


class NotifySocket:
    """The master's datagram socket; its address goes to workers as NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            # Abstract namespace: nothing to clean up on disk, and forged messages
            # are harmless because the kernel-stamped pid must be one of ours.
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(f"\0deployer-master-{os.getpid()}-{secrets.token_hex(6)}")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
        self.sock = sock
        name = sock.getsockname()
        self.address = "@" + name[1:].decode() if isinstance(name, bytes) else name

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[Notification]:
        """Every datagram waiting, with the sender's pid and uid."""
        out = []
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
            except (BlockingIOError, InterruptedError):
                return out
            pid = uid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, _ = CREDENTIALS.unpack(payload[: CREDENTIALS.size])
            out.append(Notification(pid, uid, parse_fields(data)))


class ReadyPipe:
    """Read end of a worker's readiness pipe: True once `READY=1` was seen."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""

    def read(self) -> bool | None:
        """True: ready. None: EOF (the worker closed it). False: nothing yet."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return False
        if not data:
            return None
        self.buffer = (self.buffer + data)[-4096:]
        return b"READY=1" in self.buffer


def ready_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


class SystemdNotifier:
    """sd_notify for the master itself (NOTIFY_SOCKET set by systemd)."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        # Taken out of the environment so workers never talk to systemd directly.
        return cls(os.environ.pop("NOTIFY_SOCKET", None) or None)

    def send(self, **fields: object) -> None:
        if not self.address:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        # systemd gone or not listening: nothing useful to do
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(message, socket_address(self.address))
