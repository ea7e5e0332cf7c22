"""The control socket: a unix stream socket (mode 0600) carrying JSON lines.

Request: one JSON object per line, {"cmd": "status" | "reload" | "scale" |
"stop" | "upgrade", ...}. Answers are JSON lines too; the last one of every
exchange carries "ok" (true, or false with "error"). Before it, `reload`
streams progress events ({"event": "spawned" | "ready" | "draining" |
"stopped" | ...}).

The master checks the peer's uid with SO_PEERCRED and refuses anyone but its
own user and root, even if the file mode was loosened.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

from deployer.master.config import ConfigError

CREDENTIALS = struct.Struct("3i")
MAX_REQUEST = 64 * 1024


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDENTIALS.size)
    )
    return uid


def answers(path: str) -> bool:
    """Does a master answer on this socket path?"""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, one for the NUL


def check_path(path: str, what: str = "--socket") -> None:
    """A unix socket path the kernel accepts; else bad input naming the limit."""
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise ConfigError(
            f"{what}: {path} is {size} bytes, longer than the {SUN_PATH_MAX}-byte limit"
            " of a unix socket path (sun_path); use a shorter path"
        )


class ControlServer:
    def __init__(self, path: str, sock: socket.socket | None = None) -> None:
        self.path = path
        self.sock = sock if sock is not None else self._bind(path)
        self.sock.setblocking(False)
        self.inode = os.stat(path).st_ino

    @staticmethod
    def _bind(path: str) -> socket.socket:
        check_path(path)
        if os.path.exists(path):
            if answers(path):
                raise ConfigError(f"--socket: another master is already running on {path}")
            os.unlink(path)  # left behind by a master that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no window where others could connect
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--socket: cannot create {path}: {e.strerror or e}") from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(64)
        return sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Connection | str | None:
        """A connection from an allowed peer, a refusal reason, or None (nothing pending)."""
        try:
            raw, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        uid = peer_uid(raw)
        if uid not in (os.getuid(), 0):
            with contextlib.suppress(OSError):
                raw.sendall(encode({"ok": False, "error": f"uid {uid} is not allowed"}))
            raw.close()
            return f"refused a control connection from uid {uid}"
        return Connection(raw)

    def close(self) -> None:
        self.sock.close()
        # Only remove the file if it is still ours (a new master may own the path now).
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


class Connection:
    """One client, non-blocking; output is buffered and flushed by the loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.inbuf = b""
        self.outbuf = b""
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def to_state(self, requester: bool) -> dict[str, Any]:
        """As JSON (an upgrade hands it over); requester: the client that asked for it."""
        return {
            "fd": self.fileno(),
            "inbuf": self.inbuf.decode(errors="replace"),
            "outbuf": self.outbuf.decode(errors="replace"),
            "requester": requester,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Connection:
        """Wraps the inherited fd: only once nothing else can fail."""
        conn = cls(socket.socket(fileno=d["fd"]))
        conn.inbuf, conn.outbuf = d["inbuf"].encode(), d["outbuf"].encode()
        return conn

    def read_requests(self) -> list[dict[str, Any]] | None:
        """Complete requests received so far; None when the peer went away."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            return None
        self.inbuf += data
        if len(self.inbuf) > MAX_REQUEST:
            return None
        *lines, self.inbuf = self.inbuf.split(b"\n")
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            out.append(message if isinstance(message, dict) else {"cmd": None, "raw": line[:200]})
        return out

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        self.outbuf += encode(message)
        self.flush()

    def flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                return
            self.outbuf = self.outbuf[sent:]

    def flush_blocking(self, timeout: float) -> None:
        """Last words before the master exits (or re-execs); non-blocking again after."""
        if self.closed or not self.outbuf:
            return
        self.sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            self.sock.sendall(self.outbuf)
        self.outbuf = b""
        self.sock.setblocking(False)

    @property
    def wants_write(self) -> bool:
        return bool(self.outbuf) and not self.closed


# --- client side (the CLI) ---


class ControlError(Exception):
    """The master could not be reached, or the exchange broke off."""


def request(path: str, message: dict[str, Any], timeout: float | None) -> Iterator[dict[str, Any]]:
    """Send one request; yield every answer line until the one with "ok" (or EOF).

    `timeout` bounds the whole exchange; None waits as long as it takes.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    check_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(10 if timeout is None else max(0.1, min(timeout, 10)))
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no master socket at {path}") from None
        except OSError as e:
            raise ControlError(f"cannot reach the master at {path}: {e.strerror or e}") from None
        sock.sendall(encode(message))
        buffer = b""
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            else:
                sock.settimeout(None)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as e:
                raise ControlError(f"connection to the master broke: {e.strerror or e}") from None
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    answer = json.loads(line)
                    yield answer
                    if "ok" in answer:
                        return
    finally:
        sock.close()
