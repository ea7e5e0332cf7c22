#!/usr/bin/env python3
"""Example worker for `deployer master`, standard library only.

- Serves on the socket the master passes as fd 3 (LISTEN_FDS / LISTEN_PID,
  the systemd socket-activation convention); run alone it binds $PORT.
- Tells the master it is ready: `READY=1` to $NOTIFY_SOCKET (sd_notify), or
  to the pipe in $DEPLOYER_READY_FD.
- Drains correctly on SIGTERM, which is half of a zero-downtime reload:
  stop accepting (other workers share the queue), finish in-flight requests,
  answer any further request on an open connection with `Connection: close`,
  close an idle keep-alive connection only when its idle timeout expires
  (never abruptly: the client may be sending its next request right now),
  and exit when no connection is left or at $SHUTDOWN_TIMEOUT.

Routes: `/` (who answered), `/health` (200, or 500 with FAIL_HEALTH=1),
`/slow?s=SECONDS` (answers after a delay: an in-flight request), `/env/NAME`
(the sha256 of environment variable NAME: the worker got it, it never shows).

Switches (environment, or KEY=VALUE lines in ./release.env, the way a
release ships its settings): CRASH_AT_BOOT=1, NEVER_READY=1, FAIL_HEALTH=1,
BOOT_DELAY=SECONDS, CRASH_AFTER_BOOTS=N (boots counted in ./.boots; later
boots crash), CRASH_AFTER_READY=SECONDS (exit 1 that long after ready),
IDLE_TIMEOUT=SECONDS (keep-alive, default 5).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

MAX_HEADER = 64 * 1024
BACKLOG = 65535
ACCEPT_BATCH = 64  # connections taken per wakeup: the rest of a burst is left to other workers
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


def load_release_env(path: str = "release.env") -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            key, sep, value = line.strip().partition("=")
            if sep and not key.startswith("#"):
                os.environ[key.strip()] = value.strip()


def flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def count_boot() -> int:
    fd = os.open(".boots", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def listening_socket() -> socket.socket:
    # LISTEN_PID is our pid, or our parent's when a wrapper (`sh -c`, `npm start`) runs us.
    ours = os.environ.get("LISTEN_PID") in (str(os.getpid()), str(os.getppid()))
    if ours and int(os.environ.get("LISTEN_FDS", 0)):
        sock = socket.socket(fileno=3)  # family and type are read from the fd
    else:
        sock = socket.create_server(("127.0.0.1", int(os.environ.get("PORT", "8000"))))
    sock.setblocking(False)
    return sock


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        if address.startswith("@"):
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", address)
    fd = os.environ.get("DEPLOYER_READY_FD")
    if fd:
        os.write(int(fd), b"READY=1\n")
        os.close(int(fd))


class App:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.release = os.path.basename(os.environ.get("DEPLOYER_RELEASE", os.getcwd()))
        self.idle_timeout = float(os.environ.get("IDLE_TIMEOUT", "5"))
        self.shutdown_timeout = float(os.environ.get("SHUTDOWN_TIMEOUT", "30"))
        self.connections: set[Connection] = set()
        self.adopting = 0  # accepted, transport not made yet: not in connections
        self.served = self.accepted = 0  # reported when the worker exits
        self.draining = False
        self.done = asyncio.get_running_loop().create_future()
        self.listener: socket.socket | None = None

    async def handle(self, method: str, target: str) -> tuple[int, bytes]:
        url = urlsplit(target)
        if url.path == "/":
            return 200, f"ok pid={self.pid} release={self.release}\n".encode()
        if url.path == "/health":
            return (500, b"unhealthy\n") if flag("FAIL_HEALTH") else (200, b"healthy\n")
        if url.path.startswith("/env/"):  # what the worker was given, as a sha256
            value = os.environ.get(url.path[5:], "")  # (tests; the value never shows)
            return 200, f"{hashlib.sha256(value.encode()).hexdigest()}\n".encode()
        if url.path == "/slow":
            seconds = float(parse_qs(url.query).get("s", ["1"])[0])
            await asyncio.sleep(seconds)
            return 200, f"slow ok pid={self.pid} after {seconds:g}s\n".encode()
        return 404, b"not found\n"

    # Our own accept loop rather than loop.create_server(): asyncio's Server.close()
    # makes the transport of a connection it accepted just before fail to be created
    # (an assertion in Server._attach, swallowed), and that client waits for an
    # answer until the worker exits. The benchmark saw it as a few read errors when
    # both workers drained at once.

    def listen(self, sock: socket.socket) -> None:
        # listen() on the inherited socket sets the backlog of the queue every worker
        # shares: ask for the deepest (the kernel caps it at net.core.somaxconn), or
        # reconnect bursts during a reload overflow the queue and clients wait for
        # SYN retransmits (1 s, 3 s...).
        sock.listen(BACKLOG)
        self.listener = sock
        self.resume_accepting()

    def resume_accepting(self) -> None:
        if self.listener is not None and not self.draining:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self.accept)

    def stop_accepting(self) -> None:
        if self.listener is not None:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())

    def accept(self) -> None:
        assert self.listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of fds or memory: back off rather than spin
                print(f"accept failed ({e}), pausing for 1 s", file=sys.stderr, flush=True)
                self.stop_accepting()
                asyncio.get_running_loop().call_later(1.0, self.resume_accepting)
                return
            conn.setblocking(False)
            self.adopting += 1
            asyncio.ensure_future(self.adopt(conn))

    async def adopt(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: Connection(self), conn)
        except OSError:
            conn.close()  # the client went away before we got to it
        finally:
            self.adopting -= 1
            self.maybe_finish()

    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.stop_accepting()  # the queue stays with the other workers
        if self.listener is not None:
            self.listener.close()  # our copy only
            self.listener = None
        # Open connections are left alone: a busy one closes after its response
        # (sent with Connection: close), an idle one after answering its next
        # request or when its idle timeout expires.
        loop = asyncio.get_running_loop()
        loop.call_later(self.shutdown_timeout, self.finish)
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.draining and not self.connections and not self.adopting:
            self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Connection(asyncio.BufferedProtocol):
    # BufferedProtocol: asyncio reads into our buffer with recv_into. With a plain
    # Protocol it allocates 256 KiB per recv() and shrinks it, and glibc's malloc
    # then grows and trims its heap over and over: ~25,000 page faults a second
    # per busy worker and a fifth of its CPU (seen in bench/reload_under_load.py).
    # One read buffer serves every connection: buffer_updated copies out at once.
    read_buffer = memoryview(bytearray(64 * 1024))

    def __init__(self, app: App) -> None:
        self.app = app
        self.buffer = b""
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.app.connections.add(self)
        self.app.accepted += 1
        self.start_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_idle_timer()
        self.app.connections.discard(self)
        self.app.maybe_finish()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.buffer += self.read_buffer[:nbytes]
        self.next_request()

    def start_idle_timer(self) -> None:
        self.cancel_idle_timer()
        loop = asyncio.get_running_loop()
        self.idle_timer = loop.call_later(self.app.idle_timeout, self.idle_expired)

    def cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def idle_expired(self) -> None:
        if not self.busy and not self.buffer and self.transport is not None:
            self.transport.close()

    def next_request(self) -> None:
        if self.busy or self.transport is None or self.transport.is_closing():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEADER:
                self.respond(400, b"header too large\n", close=True)
            return
        head = self.buffer[:end].decode("latin-1")
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            self.respond(400, b"bad request line\n", close=True)
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if "chunked" in headers.get("transfer-encoding", ""):
            self.respond(400, b"chunked bodies are not supported\n", close=True)
            return
        length = int(headers.get("content-length", "0") or 0)
        if len(self.buffer) < end + 4 + length:
            return  # the body is still coming
        self.buffer = self.buffer[end + 4 + length :]
        connection = headers.get("connection", "")
        close = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
        self.busy = True
        self.cancel_idle_timer()
        asyncio.ensure_future(self.serve(method, target, close))

    async def serve(self, method: str, target: str, close: bool) -> None:
        try:
            status, body = await self.app.handle(method, target)
        except Exception as e:  # noqa: BLE001 - a handler bug is a 500, not a dead worker
            status, body = 500, f"error: {e}\n".encode()
        self.respond(status, body, close)

    def respond(self, status: int, body: bytes, close: bool) -> None:
        assert self.transport is not None
        # Draining: this is the connection's last response, and the client is told.
        close = close or self.app.draining
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.app.served += 1
        self.busy = False
        if close:
            self.transport.close()  # after the buffered response is flushed
            return
        self.start_idle_timer()
        self.next_request()  # a pipelined request may be waiting


def crash(why: str) -> None:
    print(f"{why}: failing on purpose", file=sys.stderr, flush=True)
    os._exit(1)


async def main() -> None:
    load_release_env()
    if flag("CRASH_AT_BOOT"):
        print("CRASH_AT_BOOT set: failing on purpose", file=sys.stderr)
        sys.exit(3)
    limit = int(os.environ.get("CRASH_AFTER_BOOTS", "0") or 0)
    if limit and count_boot() > limit:
        print(f"boot number > CRASH_AFTER_BOOTS={limit}: failing on purpose", file=sys.stderr)
        sys.exit(3)
    time.sleep(float(os.environ.get("BOOT_DELAY", "0")))
    app = App()
    loop = asyncio.get_running_loop()
    app.listen(listening_socket())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.drain)
    if not flag("NEVER_READY"):
        notify_ready()
    crash_after = float(os.environ.get("CRASH_AFTER_READY", "0") or 0)
    if crash_after:
        loop.call_later(crash_after, crash, f"CRASH_AFTER_READY={crash_after:g}")
    print(f"pid {os.getpid()} serving release {app.release}", flush=True)
    await app.done
    cpu = sum(os.times()[:2])
    print(
        f"pid {os.getpid()} drained, exiting: {app.served} requests on {app.accepted}"
        f" connections, {cpu:.2f} s cpu",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
