"""The keeper: SSH connections and agent sessions kept open between commands.

With `[ssh] persist = SECONDS`, a command does not open its hosts' agent
sessions itself: it asks the keeper, a background process of the same user
(started by the first command that needs it), for a session per host over a
Unix socket. The keeper opens the connection and the session (`SSHHost`, as a
command would), relays the session's requests and answers, and when the
command is done takes the session back for the next command. It exits once
no command has used it for `persist` seconds; `deployer disconnect` stops it
now. Like OpenSSH's ControlPersist: a command then costs no SSH handshake, no
interpreter start on the hosts, and no import of fabric and paramiko here.

Only agent sessions go through it. Commands of their own (`setup --install`,
`exec`, `logs --follow`, `migrate`, `master ...`) still connect directly.

Protocol, per client connection: a JSON header line from the client (host,
argv, whether the connection may be retried with backoff), a JSON line back
(`{"ok": true, "nonce": N}` or the error a direct connection would have
raised), then the session's bytes both ways, unchanged. The keeper follows the
framing (deployer.hostapi.answers) to know when no request is pending: only
then does a session go back to be reused. If the session ends, a last line
`@@deployer-keeper-exit-N {...}` says how (exit code, lost connection, stderr).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any, BinaryIO

from deployer.agent_session import CHUNK, CommandTimeout, Stream
from deployer.errors import DeployerError, TransportError
from deployer.hostapi import answers
from deployer.private import not_ours
from deployer.ssh import HostKeyRefused, SSHHost

HEADER_MAX = 1 << 16
START_WAIT = 5.0  # s: a keeper just started must listen within this
POLL = 0.2  # s: how often the keeper looks whether it should end
# s: how soon a session is back for the next command once its command hung up
RELAY_POLL = 0.05
EXIT_MARK = b"@@deployer-keeper-exit-"


# --- where -----------------------------------------------------------------------------


def _base_dir() -> Path | None:
    """A directory only this user can enter, for the socket; None if it cannot be had."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "deployer" if runtime else Path(f"/tmp/deployer-{os.getuid()}")
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError:
        return None
    # somebody else's directory (or a link to one) would give them our sessions; one
    # opened up may have been used already, so it is not tightened, just not used
    if not_ours(st) or st.st_mode & 0o077:
        return None
    return base


@functools.cache
def _code() -> str:
    """This controller's code: a keeper of other code is another keeper. Every module
    of the package counts, those in its subpackages too (the inventory's SSHConfig
    the keeper builds hosts from is one)."""
    here = Path(__file__).resolve().parent
    files = [
        (str(p.relative_to(here)), p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(here.rglob("*.py"))
        if "__pycache__" not in p.parts
    ]
    return json.dumps([sys.executable, str(here), files])


def _identity() -> str:
    """The code and the state directory (tests, stages with their own) a keeper is for."""
    text = json.dumps([_code(), os.environ.get("DEPLOYER_STATE_DIR", "")])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def socket_path() -> Path | None:
    base = _base_dir()
    return None if base is None else base / f"keeper-{_identity()}.sock"


def pid_of(path: Path) -> int | None:
    """The pid of the keeper listening at `path` (its pid file), if it still runs."""
    try:
        pid = int(path.with_suffix(".pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


# --- the command's side ------------------------------------------------------------------


def _dial(path: Path, timeout: float) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start(path: Path) -> None:
    """Start a keeper for `path` in the background, in its own session."""
    package = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))
    with open(path.with_suffix(".log"), "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "deployer.keeper", str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, env=env, cwd="/",
        )  # fmt: skip


def connect(timeout: float = START_WAIT) -> socket.socket | None:
    """A connection to this controller's keeper, started if none runs; None if that
    cannot be had (the command then connects to its hosts itself)."""
    path = socket_path()
    if path is None:
        return None
    sock = _dial(path, timeout)
    if sock is not None:
        return sock
    with _STARTING:  # every host's thread gets here at once: one of them starts it
        sock = _dial(path, timeout)
        if sock is not None or path in _GAVE_UP:
            return sock
        _start(path)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            time.sleep(0.01)
            sock = _dial(path, timeout)
            if sock is not None:
                return sock
        _GAVE_UP.add(path)  # the other hosts go direct at once, not START_WAIT each
    return None


_STARTING = threading.Lock()
_GAVE_UP: set[Path] = set()  # keepers this process started in vain


class KeeperStream(Stream):
    """A host's agent session relayed by the keeper: the same bytes as over SSH,
    and a last line saying how the session ended, if it did."""

    def __init__(self, host: SSHHost, sock: socket.socket, reader: IO[bytes], mark: bytes) -> None:
        super().__init__()
        self.host, self.sock, self.mark = host, sock, mark
        self.ended: dict[str, Any] | None = None
        self.pump = threading.Thread(target=self._pump, args=(reader,), daemon=True)
        self.pump.start()

    def _pump(self, reader: IO[bytes]) -> None:
        at_start = True
        try:
            while line := reader.readline(CHUNK):
                if at_start and line.startswith(self.mark) and line.endswith(b"\n"):
                    self.ended = json.loads(line[len(self.mark) :])
                    self.err.feed(str(self.ended.get("stderr", "")).encode())
                    return
                at_start = line.endswith(b"\n")
                if not self._hand_on(line):
                    return
        except (OSError, ValueError):
            pass
        finally:
            self._hand_on(None)

    def alive(self) -> bool:
        """Also asks the socket: a keeper that just died has closed it, and the
        reader thread may not have seen that yet."""
        if not super().alive():
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # nothing to read: open
        except OSError:
            return False

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def exit_code(self, wait: float) -> tuple[int, str]:
        self.pump.join(wait)
        info = self.ended
        if info is None:  # the keeper, not the host: the next connection is as any other
            self.relay_gone = True
            return -1, "deployer's keeper went away (no exit status received)"
        if info.get("dropped"):
            self.host.lost = "the connection dropped"
        return int(info.get("code", -1)), str(info.get("lost", ""))

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


def open_session(host: SSHHost, argv: list[str] | tuple[str, ...]) -> KeeperStream | None:
    """`host`'s agent session through the keeper (a Stream), or None without one.
    What keeps the keeper from opening it raises as a direct connection would."""
    ssh = host.config.ssh
    wait = ssh.connect_timeout * 3 + ssh.retry_deadline + 10.0
    sock = connect(wait)
    if sock is None:
        return None
    header = {
        "host": {"name": host.name, "address": host.config.address, "ssh": _ssh_dict(ssh)},
        "argv": list(argv),
        "retry": host.lost is None,
        "persist": ssh.persist,
    }
    try:
        sock.sendall(json.dumps(header).encode() + b"\n")
        reader = sock.makefile("rb")
        reply = json.loads(reader.readline(HEADER_MAX) or b"null")
    except (OSError, ValueError):
        sock.close()
        return None  # a keeper that cannot answer: the command goes direct
    if not isinstance(reply, dict) or reply.get("going"):
        sock.close()
        return None  # no keeper that stays: the command goes direct
    if not reply.get("ok"):
        sock.close()
        error = str(reply.get("error", "the keeper could not open the session"))
        raise (HostKeyRefused if reply.get("refused") else TransportError)(error)
    sock.settimeout(None)
    return KeeperStream(host, sock, reader, EXIT_MARK + str(reply["nonce"]).encode() + b" ")


def _ssh_dict(ssh: Any) -> dict[str, Any]:
    return dataclasses.asdict(ssh)


def stop() -> int | None:
    """Stop this controller's keeper: its pid, or None if none was running."""
    path = socket_path()
    if path is None:
        return None
    pid = pid_of(path)
    sock = _dial(path, 2.0)
    if sock is None:
        return None
    with contextlib.closing(sock), contextlib.suppress(OSError):
        sock.sendall(b'{"stop": true}\n')
        sock.makefile("rb").readline(HEADER_MAX)
    deadline = time.monotonic() + START_WAIT  # it closes its connections, then exits
    while pid is not None and pid_of(path) == pid and time.monotonic() < deadline:
        time.sleep(0.02)
    return pid


# --- the keeper's side -------------------------------------------------------------------


class Keeper:
    """One loop accepting commands; a thread per command connection; hosts kept by
    their SSH settings, each with its idle sessions (SSHHost's own pool)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hosts: dict[str, SSHHost] = {}
        self.lock = threading.Lock()
        self.clients = 0
        self.last = time.monotonic()
        self.persist = 60.0
        self.stopping = False

    def run(self) -> None:
        lock = open(self.path.with_suffix(".lock"), "w")  # noqa: SIM115 -- held for life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"deployer keeper: another keeper serves {self.path}", file=sys.stderr)
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a dead keeper's socket
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(64)
        listener.settimeout(POLL)
        self.path.with_suffix(".pid").write_text(str(os.getpid()))
        try:
            while not self.finished():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                if not _same_user(conn):
                    conn.close()
                    continue
                with self.lock:
                    self.clients += 1
                threading.Thread(target=self.serve, args=(conn,), daemon=True).start()
        finally:
            listener.close()
            for path in (self.path, self.path.with_suffix(".pid")):
                with contextlib.suppress(OSError):
                    path.unlink()
            for host in list(self.hosts.values()):
                host.close()
            self.tidy()

    def tidy(self) -> None:
        """Leave nothing behind but a log that says something. The lock file goes
        last: a keeper starting now either sees it held, or makes a new one."""
        log = self.path.with_suffix(".log")
        with contextlib.suppress(OSError):
            if log.stat().st_size == 0:
                log.unlink()
        with contextlib.suppress(OSError):
            self.path.with_suffix(".lock").unlink()

    def finished(self) -> bool:
        with self.lock:
            idle = self.clients == 0 and time.monotonic() - self.last > self.persist
            return self.stopping or idle

    def serve(self, conn: socket.socket) -> None:
        try:
            with contextlib.closing(conn):
                self._serve(conn)
        except Exception as e:  # noqa: BLE001 -- one command's trouble, not the keeper's
            print(f"deployer keeper: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            with self.lock:
                self.clients -= 1
                self.last = time.monotonic()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        header = json.loads(reader.readline(HEADER_MAX) or b"null")
        if not isinstance(header, dict):
            return
        if header.get("stop"):
            with self.lock:
                self.stopping = True
            conn.sendall(b'{"ok": true}\n')
            return
        with self.lock:
            self.persist = float(header.get("persist") or self.persist)
            going = self.stopping
        if going:  # no session from a keeper on its way out: the command goes direct
            conn.sendall(b'{"ok": false, "going": true}\n')
            return
        host = self.host(header["host"], header["argv"])
        # as in a command of its own: after a drop, one attempt to reconnect, no backoff
        host.lost = None if header.get("retry", True) else host.lost or "the connection dropped"
        try:
            session = host.checkout(header["argv"])
        except DeployerError as e:
            reply = {"ok": False, "error": str(e), "refused": isinstance(e, HostKeyRefused)}
            conn.sendall(json.dumps(reply).encode() + b"\n")
            return
        nonce = secrets.token_hex(8)
        conn.sendall(json.dumps({"ok": True, "nonce": nonce}).encode() + b"\n")
        Relay(host, session, conn, reader, EXIT_MARK + nonce.encode() + b" ").run()

    def host(self, spec: dict[str, Any], argv: list[str]) -> SSHHost:
        """The host's connection for sessions running `argv`: another agent (its sha256
        is in argv) gets sessions of its own, never one of the previous agent."""
        from deployer.inventory import SSHConfig

        key = json.dumps([spec, argv], sort_keys=True)
        with self.lock:
            if key not in self.hosts:
                # persist 0: the keeper's own hosts connect directly, not through itself
                ssh = SSHConfig(**{**spec["ssh"], "persist": 0.0})
                config = SimpleNamespace(name=spec["name"], address=spec["address"], ssh=ssh)
                self.hosts[key] = SSHHost(config)  # type: ignore[arg-type]
            return self.hosts[key]


class Relay:
    """One command's use of one session: its requests in, the answers out, and the
    session back to the host's idle ones if no request was left unanswered."""

    def __init__(
        self, host: SSHHost, session: Any, conn: socket.socket, reader: BinaryIO, mark: bytes
    ) -> None:
        self.host, self.session, self.conn, self.reader, self.mark = (
            host, session, conn, reader, mark,
        )  # fmt: skip
        self.pending = 0
        self.lock = threading.Lock()
        self.done = threading.Event()  # the command hung up

    def run(self) -> None:
        out = threading.Thread(target=self.answers, daemon=True)
        out.start()
        clean = self.requests()
        with self.lock:
            idle = clean and self.pending == 0
        self.done.set()
        if not idle:  # an answer still owed to nobody: the session cannot be reused
            self.session.broken = True
            self.session.close()
        out.join()
        if idle and self.session.stream.alive():
            self.host.checkin(self.session)
        else:
            self.session.close()

    def requests(self) -> bool:
        """Relay request frames until the command hangs up; False if it did so in the
        middle of one (or sent a garbled one)."""
        stream = self.session.stream
        while True:
            line = self.reader.readline(answers.MAX_REQUEST_LINE)
            if not line:
                return True
            try:
                _, _, size = answers.parse_request(line)
            except ValueError:
                return False
            payload = self.reader.read(size) if size else b""
            if len(payload) != size:
                return False
            with self.lock:
                self.pending += 1
            try:
                stream.write(line + payload)
            except OSError:
                return False

    def answers(self) -> None:
        stream, at_start = self.session.stream, True
        while True:
            with self.lock:
                if self.done.is_set() and self.pending == 0:
                    return
            try:
                raw = stream.readline(RELAY_POLL)
            except CommandTimeout:
                continue
            if raw is None:
                if not self.done.is_set():  # not the end this relay itself made
                    self.ended(at_start)
                return
            whole = at_start and raw.endswith(b"\n")
            if whole and answers.end_id(raw.decode("utf-8", "replace").rstrip("\n")) is not None:
                with self.lock:
                    self.pending -= 1
            at_start = raw.endswith(b"\n")
            try:
                self.conn.sendall(raw)
            except OSError:
                self.session.broken = True  # the rest of this answer has nowhere to go

    def ended(self, at_start: bool) -> None:
        """The session ended: tell the command how, as its own stream would have."""
        self.session.broken = True
        code, lost = self.session.stream.exit_code(2.0)
        info = {
            "code": code,
            "lost": lost,
            "dropped": self.host.lost is not None,
            "stderr": self.session.stream.err.text(),
        }
        line = (b"" if at_start else b"\n") + self.mark + json.dumps(info).encode() + b"\n"
        with contextlib.suppress(OSError):
            self.conn.sendall(line)
            self.conn.shutdown(socket.SHUT_WR)


def _same_user(conn: socket.socket) -> bool:
    """Only this user's commands may use the keeper (the directory says so too)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m deployer.keeper SOCKET", file=sys.stderr)
        return 2
    keeper = Keeper(Path(argv[0]))

    def stop_soon(_signum: int, _frame: object) -> None:
        keeper.stopping = True  # the loop sees it within POLL, then closes up

    signal.signal(signal.SIGTERM, stop_soon)
    keeper.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
