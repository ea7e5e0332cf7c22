"""Helpers that order a test by the events themselves, never by sleeping:

- `Stream`: a control-socket exchange read one answer at a time, each stamped
  with the moment it arrived, so a test can act on the master's own events
  ("spawned", "ready", "draining"...) while the reload is still running;
- `InFlight`: an HTTP request on a raw socket, and `wait_read()`, which returns
  once the worker has read the request off the connection (the server side of
  the connection has nothing left to read: `ss` shows its Recv-Q at 0). From
  then on the request is in flight, whatever a test does next.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from master_helpers import wait_for


class Stream:
    """One control-socket request; its answers as they come, with arrival times."""

    def __init__(self, path: str | Path, message: dict[str, Any], timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.sock.sendall((json.dumps(message) + "\n").encode())
        self.buffer = b""
        self.seen: list[tuple[float, dict[str, Any]]] = []  # (monotonic arrival, answer)

    def next(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"the master closed the connection; answers: {self.answers}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer = json.loads(line)
        self.seen.append((time.monotonic(), answer))
        return answer

    def until(self, predicate) -> dict[str, Any]:
        """Read until an answer matches; fail if the exchange ends first."""
        while True:
            answer = self.next()
            if predicate(answer):
                return answer
            if "ok" in answer:
                raise AssertionError(f"ended before the awaited event: {self.answers}")

    def finish(self) -> dict[str, Any]:
        """Read to the final answer (the one with "ok") and close."""
        try:
            while not self.seen or "ok" not in self.seen[-1][1]:
                self.next()
        finally:
            self.sock.close()
        return self.seen[-1][1]

    @property
    def answers(self) -> list[dict[str, Any]]:
        return [a for _, a in self.seen]

    def at(self, event: str, worker: int, phase: str | None = None) -> float:
        """When the first `event` about `worker` arrived."""
        return next(
            t
            for t, a in self.seen
            if a.get("event") == event and a.get("worker") == worker and a.get("phase") == phase
        )


def server_recv_q(port: int, client_port: int) -> int | None:
    """Bytes the server side of one loopback connection has not read yet (None: no socket)."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} and dport = :{client_port} )"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return int(out[0]) if out else None


class InFlight:
    """GET `path` on a raw connection; `wait_read()` returns once a worker read it."""

    def __init__(self, port: int, path: str, timeout: float = 30) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())

    def wait_read(self, timeout: float = 10) -> None:
        client_port = self.sock.getsockname()[1]
        wait_for(
            lambda: server_recv_q(self.port, client_port) == 0,
            timeout,
            "a worker to read the request",
            interval=0.02,
        )

    def response(self) -> tuple[int, str]:
        """(status, body) of the answer; raises OSError if the connection was cut."""
        data = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    length = next(
                        (
                            int(h.split(b":", 1)[1])
                            for h in head.split(b"\r\n")
                            if h.lower().startswith(b"content-length:")
                        ),
                        None,
                    )
                    if length is not None and len(body) >= length:
                        break
        finally:
            self.sock.close()
        if not data:
            raise ConnectionResetError("the connection closed with no answer")
        status = int(data.split(b" ", 2)[1])
        return status, data.partition(b"\r\n\r\n")[2].decode()


class CountingProxy:
    """A TCP relay in front of one sshd, on the host's own address: every byte that
    reaches the host through it is counted (`to_host`), as the host receives it."""

    def __init__(self, address: str, port: int) -> None:
        import threading

        self.upstream = (address, port)
        self.server = socket.create_server((address, 0))
        self.port = self.server.getsockname()[1]
        self.to_host = 0
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self) -> None:
        import threading

        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                host = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            host.settimeout(None)
            threading.Thread(target=self.pump, args=(client, host, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(host, client, False), daemon=True).start()

    def pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self.lock:
                        self.to_host += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def take(self) -> int:
        """Bytes counted since the last take."""
        with self.lock:
            n, self.to_host = self.to_host, 0
        return n

    def close(self) -> None:
        self.closed = True
        self.server.close()
