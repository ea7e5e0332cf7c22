"""`Host`: run a command, stream stdin and stdout, put a file, on a local or SSH host.

Commands are argument lists. Quoting happens in exactly one place,
`command_line()`, and only for SSH, where the remote login shell parses the
line; a local command runs without any shell.

SSH hosts go through fabric's `Connection` (so ~/.ssh/config aliases,
ProxyJump and identity files work) with two of its defaults overridden:
fabric installs paramiko's AutoAddPolicy and loads no known_hosts, i.e. it
trusts any key (fabric #1804, #2071). Here host keys are verified against
`known_hosts`; an unknown key is refused unless `trust_new_hosts`, a changed
key always.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from deployer.agent_session import (
    CHUNK,
    STREAMED_TAIL,
    CommandTimeout,
    LineCallback,
    Output,
    SessionPool,
    Stdin,
    Stream,
    feed_stdin,
)
from deployer.errors import CommandFailed, TransportError

if TYPE_CHECKING:
    from deployer.inventory import HostConfig

# opens a host's agent session elsewhere (deployer.keeper.open_session); None: cannot
SessionRelay = Callable[["SSHHost", "list[str] | tuple[str, ...]"], "Stream | None"]
Source = bytes | str | os.PathLike[str]  # file content, or a local path to read it from

STDERR_TAIL_LINES = 20
KEEPALIVE_S = 15
# A refused connection is a clear answer (no sshd there), retried only this long:
# sshd restarting refuses for a moment; past that, say so, not a timeout later on.
REFUSED_RETRY_S = 3.0


@dataclass(frozen=True)
class Result:
    host: str
    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        return "\n".join(self.stderr.rstrip("\n").splitlines()[-lines:])

    def check(self) -> Result:
        """Return self, or raise CommandFailed naming host, command, exit code and stderr."""
        if self.ok:
            return self
        message = f"{self.host}: `{label(self.argv)}` exited with {self.exit_code}"
        tail = self.stderr_tail()
        raise CommandFailed(self, f"{message}; stderr:\n{tail}" if tail else message)


@dataclass(frozen=True)
class Command:
    """One command for a host, as data: what runs, where, with what input."""

    argv: tuple[str, ...]
    cwd: str | None = None
    env: dict[str, str] | None = None
    stdin: Stdin = None
    timeout: float | None = None
    on_stdout: LineCallback | None = None

    def line(self) -> str:
        return command_line(self.argv, self.cwd, self.env)

    def label(self) -> str:
        return label(self.argv)


class Transport(SessionPool):
    """What every transport offers: run a command, put a file, close; and its agent
    sessions (deployer.agent_session)."""

    name: str

    def run(
        self,
        argv: list[str] | tuple[str, ...],
        *,
        stdin: Stdin = None,
        timeout: float | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        on_stdout: LineCallback | None = None,
        check: bool = False,
    ) -> Result:
        """Run argv (never through a local shell); check=True raises CommandFailed on exit != 0."""
        result = self.execute(Command(tuple(argv), cwd, env, stdin, timeout, on_stdout))
        return result.check() if check else result

    @abstractmethod
    def execute(self, cmd: Command) -> Result: ...

    @abstractmethod
    def put(self, source: Source, remote_path: str, mode: int = 0o644) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


def label(argv: list[str] | tuple[str, ...]) -> str:
    """A command for a message: a script given inline (`python3 -c ...`) is named,
    not printed."""
    return shlex.join("<script>" if "\n" in w or len(w) > 200 else w for w in argv)


def command_line(
    argv: list[str] | tuple[str, ...], cwd: str | None = None, env: dict[str, str] | None = None
) -> str:
    """The one place an argument list becomes a shell line: every word quoted once."""
    if not argv:
        raise ValueError("empty command")
    words = list(argv)
    if env:
        words = ["env", *(f"{k}={v}" for k, v in env.items()), *words]
    line = shlex.join(words)
    return f"cd {shlex.quote(cwd)} && {line}" if cwd else line


# --- shared plumbing ------------------------------------------------------------------


def _outputs(cmd: Command) -> tuple[Output, Output]:
    """stdout and stderr collectors; bounded tails when stdout is streamed."""
    keep = STREAMED_TAIL if cmd.on_stdout is not None else None
    return Output(cmd.on_stdout, keep), Output(None, keep)


def _source_bytes(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


class _FailedStream(Stream):
    """A command that could not start at all (no such executable, locally)."""

    def __init__(self, code: int, stderr: str) -> None:
        super().__init__()
        self.code = code
        self.err.feed(stderr.encode())
        self.lines.put(None)

    def write(self, data: bytes) -> None:
        pass

    def exit_code(self, wait: float) -> tuple[int, str]:
        return self.code, ""

    def close(self) -> None:
        pass


class _LocalStream(Stream):
    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__()
        self.proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout, proc.stderr
        threading.Thread(target=self._pump_lines, args=(out.readline,), daemon=True).start()
        threading.Thread(
            target=self._pump_err, args=(lambda: err.read1(CHUNK),), daemon=True
        ).start()

    def alive(self) -> bool:
        return super().alive() and self.proc.poll() is None

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def exit_code(self, wait: float) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return -1, "it closed its output but did not exit"
        if code < 0:
            return -1, f"killed by signal {-code}"
        return code, ""

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=2.0)  # EOF on its requests: it exits by itself
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)


class _SSHStream(Stream):
    def __init__(self, host: SSHHost, chan: Any) -> None:
        super().__init__()
        self.host, self.chan = host, chan
        out = chan.makefile("rb")
        threading.Thread(target=self._pump_lines, args=(out.readline,), daemon=True).start()
        read_err = lambda: chan.recv_stderr(CHUNK)  # noqa: E731
        threading.Thread(target=self._pump_err, args=(read_err,), daemon=True).start()

    def alive(self) -> bool:
        chan = self.chan
        transport = chan.get_transport()
        return (
            super().alive()
            and not chan.closed
            and not chan.eof_received
            and not chan.exit_status_ready()
            and transport is not None
            and transport.is_active()
        )

    def write(self, data: bytes) -> None:
        import paramiko

        try:
            self.chan.sendall(data)
        except (paramiko.SSHException, EOFError) as e:
            raise OSError(_reason(e)) from None

    def exit_code(self, wait: float) -> tuple[int, str]:
        end = time.monotonic() + wait
        while not self.chan.exit_status_ready() and time.monotonic() < end:
            if not self.chan.get_transport().is_active():
                break
            time.sleep(0.01)
        if self.chan.exit_status_ready():
            code = self.chan.recv_exit_status()
            if code != -1:
                return code, ""
        transport = self.chan.get_transport()
        if transport is not None and transport.is_active():
            # sshd sends exit-signal, not exit-status, for a command a signal ended
            return -1, "the agent was killed on the host by a signal (no exit status)"
        self.host.lost = "the connection dropped"
        self.host.close()  # the next call reconnects (once)
        return -1, "the connection dropped (no exit status received)"

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.chan.shutdown_write()  # EOF on its requests: it exits by itself
        with contextlib.suppress(Exception):
            self.chan.close()


# --- local ----------------------------------------------------------------------------


class LocalHost(Transport):
    """This machine, through subprocess; no shell involved."""

    def __init__(self, name: str = "local") -> None:
        self.name = name

    def execute(self, cmd: Command) -> Result:
        argv, stdin, timeout = cmd.argv, cmd.stdin, cmd.timeout
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cmd.cwd,
                env={**os.environ, **cmd.env} if cmd.env else None,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own group, so a timeout kills all it started
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
            return Result(self.name, argv, 127, "", f"{e}\n")
        out, err = _outputs(cmd)
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
            threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
        ]
        for t in readers:
            t.start()
        if stdin is not None:
            assert proc.stdin is not None
            feed_stdin(stdin, proc.stdin.write, proc.stdin.close)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise CommandTimeout(
                f"{self.name}: `{label(argv)}` did not finish within {timeout:g}s (killed)"
            ) from None
        for t in readers:
            t.join()
        return Result(self.name, argv, code, out.text(), err.text())

    def open_stream(self, argv: list[str] | tuple[str, ...]) -> Stream:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
            return _FailedStream(127, f"{e}\n")
        return _LocalStream(proc)

    def put(self, source: Source, remote_path: str, mode: int = 0o644) -> None:
        """Write atomically: a reader sees the old file or the new one, never half."""
        target = Path(remote_path)
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        except OSError as e:  # like SSHHost.put: a DeployerError naming host and path
            raise TransportError(
                f"{self.name}: could not put {remote_path}: {e.strerror} ({target.parent})"
            ) from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_source_bytes(source))
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        self.close_sessions()


def _drain(stream: IO[bytes], sink: Output) -> None:
    while chunk := stream.read1(CHUNK):  # type: ignore[attr-defined]
        sink.feed(chunk)
    stream.close()


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- ssh ------------------------------------------------------------------------------


class HostKeyRefused(TransportError):
    pass


def fingerprint(key: Any) -> str:
    """OpenSSH-style SHA256 fingerprint, the form `ssh-keygen -lf` prints."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass
class Backoff:
    """Delays 0.25, 0.5, 1, 2, 2, ... seconds, each +/-20 %, within a total deadline."""

    deadline: float
    first: float = 0.25
    cap: float = 2.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)

    def delays(self) -> Iterator[float]:
        end = time.monotonic() + self.deadline
        delay, slept = self.first, 0.0
        while True:
            pause = delay * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
            # Both clocks count: wall time (attempts take time too) and the pauses given.
            if time.monotonic() + pause > end or slept + pause > self.deadline:
                return
            slept += pause
            yield pause
            delay = min(delay * 2, self.cap)


class SSHHost(Transport):
    """A host reached over SSH; one connection, opened on first use and reused."""

    def __init__(self, config: HostConfig, relay: SessionRelay | None = None) -> None:
        self.config = config
        self.name = config.name
        self._conn: Any = None
        self._lock = threading.Lock()
        self.relay = relay if config.ssh.persist > 0 else None

    # connection management

    def _new_connection(self) -> Any:
        from fabric import Config, Connection

        ssh = self.config.ssh
        connect_kwargs: dict[str, Any] = {
            "banner_timeout": ssh.connect_timeout,
            "auth_timeout": ssh.connect_timeout,
        }
        if ssh.identity:
            connect_kwargs["key_filename"] = [os.path.expanduser(ssh.identity)]
        # Through the Config, not the constructor, so ProxyJump hops get the same keys.
        config = Config(
            overrides={
                "connect_kwargs": connect_kwargs,
                "timeouts": {"connect": max(1, round(ssh.connect_timeout))},
            },
            runtime_ssh_path=os.path.expanduser(ssh.config_file) if ssh.config_file else None,
        )
        conn = Connection(self.config.address, user=ssh.user, port=ssh.port, config=config)
        policy = _KnownHostsPolicy(self, Path(os.path.expanduser(ssh.known_hosts)))
        # Every hop verifies host keys, not just the last one: fabric builds
        # ProxyJump gateways as Connections with AutoAddPolicy too.
        hop = conn
        while isinstance(hop, Connection):
            policy.install(hop.client)
            hop = hop.gateway
        return conn

    def connection(self) -> Any:
        """The open fabric Connection, reconnecting (with backoff) if it dropped."""
        with self._lock:
            if self._conn is not None and self._conn.is_connected:
                return self._conn
            self._close_quietly()
            self._conn = self._open_with_retry(retry=self.lost is None)
            self.lost = None
            return self._conn

    def _open_with_retry(self, retry: bool = True) -> Any:
        """`retry` False (the last connection dropped mid-session): one attempt."""
        import paramiko

        ssh = self.config.ssh
        where = f"{self.config.address}:{ssh.port}"
        attempts = 0
        started = time.monotonic()
        delays = Backoff(ssh.retry_deadline if retry else 0.0).delays()
        refused_since: float | None = None  # refused since then, every attempt
        while True:
            attempts += 1
            conn = self._new_connection()
            try:
                if conn.gateway is None:  # a ProxyJump or ProxyCommand brings its own
                    conn.connect_kwargs["sock"] = _tcp_socket(conn.host, conn.port, ssh)
                conn.open()
                # a NAT or firewall that drops an idle connection is noticed (a frozen
                # host is not: every command's deadline covers that)
                conn.transport.set_keepalive(KEEPALIVE_S)
                return conn
            except HostKeyRefused:
                conn.close()
                raise
            except paramiko.BadHostKeyException as e:
                conn.close()
                raise HostKeyRefused(_changed_key_message(self, e, conn.port)) from None
            except paramiko.AuthenticationException as e:
                conn.close()
                raise TransportError(
                    f"{self.name}: authentication failed for user {conn.user!r} at {where}: {e}"
                ) from None
            except (OSError, EOFError, paramiko.SSHException) as e:
                conn.close()
                now = time.monotonic()
                if not _refused(e):
                    refused_since = None
                elif refused_since is None:
                    refused_since = now
                pause = next(delays, None)
                refused_for = 0.0 if refused_since is None else now - refused_since
                if pause is None or refused_for + pause > REFUSED_RETRY_S:
                    tries = f"{attempts} attempts over {now - started:.1f}s"
                    raise TransportError(self._unreachable(where, e, tries)) from None
                time.sleep(pause)

    def _unreachable(self, where: str, e: BaseException, tries: str) -> str:
        if _refused(e):
            return f"{self.name}: connection refused at {where} (no sshd listening? {tries})"
        return f"{self.name}: cannot connect to {where} ({tries}): {_reason(e)}"

    def _close_quietly(self) -> None:
        if self._conn is not None:
            # a dead connection may fail to close; it is gone either way
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.close_sessions()
        # A thread stuck opening the connection to a frozen host holds the lock: that
        # connection is abandoned, not waited for (closing must be bounded too).
        if self._lock.acquire(timeout=2.0):
            try:
                self._close_quietly()
            finally:
                self._lock.release()

    # operations

    def _start(self, line: str, label: str) -> tuple[Any, Any]:
        """A channel running `line`: (transport, channel). Failing, nothing ran yet,
        and the next call reconnects."""
        import paramiko

        transport = self.connection().transport
        try:
            chan = transport.open_session(timeout=self.config.ssh.connect_timeout)
            chan.exec_command(line)
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.close()
            raise TransportError(f"{self.name}: could not start `{label}`: {_reason(e)}") from None
        return transport, chan

    def execute(self, cmd: Command) -> Result:
        import paramiko

        label = cmd.label()
        transport, chan = self._start(cmd.line(), label)
        try:
            code, out, err = self._collect(chan, cmd, label)
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.close()
            raise TransportError(
                f"{self.name}: connection lost while running `{label}` "
                f"(it may or may not have completed): {_reason(e)}"
            ) from None
        finally:
            chan.close()
        if code == -1:
            if transport.is_active():
                # sshd sends exit-signal, not exit-status, for a command a signal ended
                # (paramiko drops it): the connection itself is fine
                raise TransportError(
                    f"{self.name}: `{label}` was killed on the host by a signal "
                    "(it ended without an exit status)"
                )
            self.close()
            raise TransportError(
                f"{self.name}: connection lost while running `{label}` (no exit status received)"
            )
        return Result(self.name, cmd.argv, code, out, err)

    def open_stream(self, argv: list[str] | tuple[str, ...]) -> Stream:
        if self.relay is not None:
            stream = self.relay(self, argv)
            if stream is not None:
                return stream  # else no keeper could be had: connect directly
        _, chan = self._start(command_line(argv), label(argv))
        return _SSHStream(self, chan)

    def _collect(self, chan: Any, cmd: Command, line: str) -> tuple[int, str, str]:
        import select

        out, err = _outputs(cmd)
        stdin, timeout = cmd.stdin, cmd.timeout
        if stdin is None:
            chan.shutdown_write()  # the command sees EOF on stdin at once
        else:
            feed_stdin(stdin, chan.sendall, chan.shutdown_write)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            while chan.recv_ready():
                out.feed(chan.recv(CHUNK))
            while chan.recv_stderr_ready():
                err.feed(chan.recv_stderr(CHUNK))
            if chan.exit_status_ready() and chan.eof_received:
                break
            if chan.closed:
                break
            wait = 1.0 if end is None else min(1.0, end - time.monotonic())
            if wait <= 0:
                raise CommandTimeout(
                    f"{self.name}: `{line}` did not finish within {timeout:g}s (channel closed)"
                )
            select.select([chan], [], [], wait)
        # The exit status can arrive before the last bytes: read to EOF.
        while data := chan.recv(CHUNK):
            out.feed(data)
        while data := chan.recv_stderr(CHUNK):
            err.feed(data)
        code = chan.recv_exit_status() if chan.exit_status_ready() else -1
        return code, out.text(), err.text()

    def put(self, source: Source, remote_path: str, mode: int = 0o644) -> None:
        """Upload over SFTP to a temporary name, then rename: readers never see half a file."""
        import io

        import paramiko

        data = _source_bytes(source)
        tmp = f"{remote_path}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
        sftp = self.connection().sftp()
        try:
            sftp.putfo(io.BytesIO(data), tmp, confirm=True)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, remote_path)
        except (OSError, paramiko.SSHException, EOFError) as e:
            with contextlib.suppress(OSError, paramiko.SSHException, EOFError):
                sftp.remove(tmp)
            raise TransportError(
                f"{self.name}: could not put {remote_path}: {_reason(e)}"
            ) from None


class _PromptSocket(socket.socket):
    """A TCP socket that sends small packets at once and acknowledges at once.

    Without this every connection lost ~90 ms to Nagle's algorithm meeting
    delayed ACKs: paramiko's auth request waited for an ACK (TCP_NODELAY fixes
    that side), and sshd holds back its reply to the first channel open, sent
    right after a packet that needs no answer, until the client's delayed ACK
    (~40 ms). Linux leaves quick-ACK mode by itself, so it is set again after
    every read."""

    def recv(self, size: int, flags: int = 0) -> bytes:
        data = super().recv(size, flags)
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        return data


QUICKACK = getattr(socket, "TCP_QUICKACK", 0)


def _tcp_socket(host: str, port: int, ssh: Any) -> socket.socket:
    """A connected socket to host:port (each address in turn, as paramiko does),
    within the connect timeout; what fails, paramiko's exception says."""
    import paramiko

    errors: dict[tuple[str, int], OSError] = {}
    infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    for family, kind, proto, _, address in infos:
        sock = (_PromptSocket if QUICKACK else socket.socket)(family, kind, proto)
        try:
            sock.settimeout(ssh.connect_timeout)
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            sock.close()
            errors[(str(address[0]), int(address[1]))] = e
    if len(errors) == 1 and isinstance(next(iter(errors.values())), TimeoutError):
        raise next(iter(errors.values()))
    raise paramiko.ssh_exception.NoValidConnectionsError(errors)


def _refused(e: BaseException) -> bool:
    """Every address of the host refused the connection (paramiko wraps them)."""
    inner = getattr(e, "errors", None)
    errors = list(inner.values()) if isinstance(inner, dict) and inner else [e]
    return all(isinstance(x, ConnectionRefusedError) for x in errors)


def _reason(e: BaseException) -> str:
    # paramiko wraps per-address socket errors; the inner one says what happened
    inner = getattr(e, "errors", None)
    if isinstance(inner, dict) and inner:
        e = next(iter(inner.values()))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


def known_hosts_name(hostname: str, port: int) -> str:
    """A host as known_hosts and `ssh-keygen -R` name it: `[host]:port` off port 22."""
    if port == 22 or hostname.startswith("["):
        return hostname
    return f"[{hostname}]:{port}"


def _changed_key_message(host: SSHHost, e: Any, port: int) -> str:
    known_hosts = shlex.quote(os.path.expanduser(host.config.ssh.known_hosts))
    # paramiko names the host bare, whatever the port; known_hosts does not
    name = known_hosts_name(e.hostname, port)
    return (
        f"{host.name}: HOST KEY CHANGED for {name}: known_hosts has {fingerprint(e.expected_key)}, "
        f"the host presented {fingerprint(e.key)}. Refusing to connect: this may be an attack. "
        f"If the change is expected, remove the old key with "
        f"`ssh-keygen -R {shlex.quote(name)} -f {known_hosts}`."
    )


class _KnownHostsPolicy:
    """Verify against known_hosts; unknown keys are refused, or recorded when trusted."""

    def __init__(self, host: SSHHost, path: Path) -> None:
        self.host = host
        self.path = path

    def install(self, client: Any) -> None:
        system = Path("/etc/ssh/ssh_known_hosts")
        if system.is_file():
            client.load_system_host_keys(str(system))
        if self.path.is_file():
            client.load_host_keys(str(self.path))
        # paramiko takes any object with missing_host_key() as a policy.
        client.set_missing_host_key_policy(self)

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        entry = f"{hostname} {key.get_name()} {key.get_base64()}"
        if self.host.config.ssh.trust_new_hosts:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(self.path, "a") as fh:
                fh.write(entry + "\n")
            client.get_host_keys().add(hostname, key.get_name(), key)
            return
        raise HostKeyRefused(
            f"{self.host.name}: unknown host key for {hostname} "
            f"({key.get_name()} {fingerprint(key)}), not in {self.path}. "
            f"If that fingerprint is right, trust it with:\n"
            f"  echo {shlex.quote(entry)} >> {shlex.quote(str(self.path))}\n"
            f"or set trust_new_hosts = true for this host in the inventory."
        )


# --- pool -----------------------------------------------------------------------------


class HostPool:
    """One Transport per inventory host within a process; closes them all at the end.
    `relay`: how SSH hosts with `[ssh] persist` open agent sessions (deployer.keeper)."""

    def __init__(self, relay: SessionRelay | None = None) -> None:
        self._hosts: dict[str, Transport] = {}
        self._lock = threading.Lock()
        self._relay = relay

    def get(self, config: HostConfig) -> Transport:
        with self._lock:
            host = self._hosts.get(config.name)
            if host is None:
                host = connect(config, self._relay)
                self._hosts[config.name] = host
            return host

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(config: HostConfig, relay: SessionRelay | None = None) -> Transport:
    """The Transport for an inventory entry (nothing is opened until the first command)."""
    if config.transport == "local":
        return LocalHost(config.name)
    return SSHHost(config, relay)
