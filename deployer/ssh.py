"""SSH hosts: `SSHHost`, a Transport over fabric's `Connection` (so ~/.ssh/config
aliases, ProxyJump and identity files work) with two of its defaults overridden:
fabric installs paramiko's AutoAddPolicy and loads no known_hosts, i.e. it trusts
any key (fabric #1804, #2071). Here host keys are verified against `known_hosts`;
an unknown key is refused unless `trust_new_hosts`, a changed key always.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployer.agent_session import (
    CHUNK,
    CommandTimeout,
    Stream,
    feed_stdin,
)
from deployer.errors import TransportError
from deployer.transport import (
    Command,
    Result,
    Source,
    Transport,
    command_line,
    label,
    outputs,
    source_bytes,
)

if TYPE_CHECKING:
    from deployer.inventory import HostConfig

# opens a host's agent session elsewhere (deployer.keeper.open_session); None: cannot
SessionRelay = Callable[["SSHHost", "list[str] | tuple[str, ...]"], "Stream | None"]

KEEPALIVE_S = 15
# A refused connection is a clear answer (no sshd there), retried only this long:
# sshd restarting refuses for a moment; past that, say so, not a timeout later on.
REFUSED_RETRY_S = 3.0


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

        out, err = outputs(cmd)
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

        data = source_bytes(source)
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
