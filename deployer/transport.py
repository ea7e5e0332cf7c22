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
import queue
import random
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from deployer.errors import CommandFailed, DeployerError, TransportError
from deployer.hostapi import answers

if TYPE_CHECKING:
    from deployer.inventory import HostConfig

LineCallback = Callable[[str], None]
# opens a host's agent session elsewhere (deployer.keeper.open_session); None: cannot
SessionRelay = Callable[["SSHHost", "list[str] | tuple[str, ...]"], "Stream | None"]
Stdin = bytes | str | IO[bytes] | Iterable[bytes] | None
Source = bytes | str | os.PathLike[str]  # file content, or a local path to read it from

STDERR_TAIL_LINES = 20
CHUNK = 64 * 1024
KEEPALIVE_S = 15
# A refused connection is a clear answer (no sshd there), retried only this long:
# sshd restarting refuses for a moment; past that, say so, not a timeout later on.
REFUSED_RETRY_S = 3.0
STREAMED_TAIL = 1 << 20  # bytes of a streamed command's output kept for its Result
MAX_LINE = 1 << 20  # a longer line reaches the line callback in parts


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


_SESSIONS_INIT = threading.Lock()


class Transport(ABC):
    """What every transport offers: run a command, put a file, close."""

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
    def open_stream(self, argv: list[str] | tuple[str, ...]) -> Stream:
        """Start argv with stdin, stdout and stderr open (an agent session)."""

    # Agent sessions: idle ones are reused; a caller that finds none idle (the lock
    # heartbeat while a prepare runs) gets one of its own, unless one is being
    # opened (open_ahead): it waits for that one.
    _idle: list[AgentSession]
    _sessions: threading.Condition
    _opening: int
    # why the last session's connection dropped: the next connection gets one attempt
    lost: str | None = None

    def _session_state(self) -> threading.Condition:
        if not hasattr(self, "_sessions"):
            with _SESSIONS_INIT:
                if not hasattr(self, "_sessions"):
                    self._idle, self._opening = [], 0
                    self._ahead_error: BaseException | None = None
                    self._sessions = threading.Condition()
        return self._sessions

    def checkout(self, argv: list[str] | tuple[str, ...], ahead: bool = False) -> AgentSession:
        cond = self._session_state()
        with cond:
            while True:
                while self._idle:
                    session = self._idle.pop()
                    if session.stream.alive():
                        return session
                    # it ended between calls (a dropped connection, a host that went
                    # away): a new one, through a new connection if need be
                    session.close()
                if self._ahead_error is not None:
                    # opening it ahead failed (retries and all): this call reports
                    # that, rather than waiting out another round of retries
                    error, self._ahead_error = self._ahead_error, None
                    raise error
                if not self._opening:
                    break
                cond.wait()
            self._opening += 1
        failed: DeployerError | None = None
        try:
            return AgentSession(self.name, self.open_stream(argv))
        except DeployerError as e:
            failed = e
            raise
        finally:
            with cond:
                self._opening -= 1
                if ahead and failed is not None:
                    self._ahead_error = failed  # for the call that waited for this one
                cond.notify_all()

    def checkin(self, session: AgentSession) -> None:
        """Back to the idle ones for the next call (here, or the keeper's next command);
        a broken one is closed."""
        if session.broken:
            session.close()
            return
        with self._session_state():
            self._idle.append(session)
            self._sessions.notify_all()

    @contextlib.contextmanager
    def agent_session(self, argv: list[str] | tuple[str, ...]) -> Iterator[AgentSession]:
        """An agent session running argv, for one call or a pipelined few; it goes
        back to the idle ones unless it broke (then it is closed)."""
        session = self.checkout(argv)
        try:
            yield session
        except BaseException:
            session.close()
            raise
        self.checkin(session)

    def open_ahead(self, argv: list[str] | tuple[str, ...]) -> None:
        """Open an agent session now (connection included), idle for the first call;
        a failure is left for that call to meet and report."""
        cond = self._session_state()
        with cond:
            if self._idle or self._opening:
                return
        try:
            session = self.checkout(argv, ahead=True)
        except Exception:  # noqa: BLE001 -- the first real call reports it (_ahead_error)
            return
        self.checkin(session)

    def close_sessions(self) -> None:
        if not hasattr(self, "_idle"):
            return
        with self._sessions:
            idle, self._idle = self._idle, []
        for session in idle:
            session.close()

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


class _Output:
    """Collects a byte stream; hands complete lines to a callback as they arrive.

    A streamed command (one with a callback) can print without end: a build's
    200 MB must not all be held here. Its output is kept as a bounded tail, which
    still holds the agent's answer, always the last line (hostapi.answers)."""

    def __init__(self, on_line: LineCallback | None, keep: int | None = None) -> None:
        self.on_line = on_line
        self.keep = keep  # bytes of tail kept; None: everything
        self.data = bytearray()
        self._partial = bytearray()

    def feed(self, data: bytes) -> None:
        self.data += data
        if self.keep is not None and len(self.data) > 2 * self.keep:
            self._trim()
        if self.on_line is not None:
            self._split(data)

    def _trim(self) -> None:
        # Trimmed once per `keep` bytes, so the copying stays linear. The tail
        # starts at a line where there is one.
        assert self.keep is not None
        cut = len(self.data) - self.keep
        newline = self.data.find(b"\n", cut)
        del self.data[: newline + 1 if newline != -1 else cut]

    def _split(self, data: bytes) -> None:
        assert self.on_line is not None
        self._partial += data
        if b"\n" in data:
            *lines, rest = self._partial.split(b"\n")
            self._partial = bytearray(rest)
        elif len(self._partial) > MAX_LINE:  # a line without end: hand it on in parts
            lines, self._partial = [self._partial], bytearray()
        else:
            return
        for line in lines:
            self.on_line(line.decode("utf-8", "replace"))

    def text(self) -> str:
        if self.on_line is not None and self._partial:
            self.on_line(self._partial.decode("utf-8", "replace"))
            self._partial = bytearray()
        return self.data.decode("utf-8", "replace")


def _outputs(cmd: Command) -> tuple[_Output, _Output]:
    """stdout and stderr collectors; bounded tails when stdout is streamed."""
    keep = STREAMED_TAIL if cmd.on_stdout is not None else None
    return _Output(cmd.on_stdout, keep), _Output(None, keep)


def _chunks(stdin: Stdin) -> Iterator[bytes]:
    if stdin is None:
        return
    if isinstance(stdin, str):
        stdin = stdin.encode()
    if isinstance(stdin, bytes | bytearray | memoryview):
        data = bytes(stdin)
        for i in range(0, len(data), CHUNK):
            yield data[i : i + CHUNK]
        return
    if hasattr(stdin, "read"):
        while chunk := stdin.read(CHUNK):
            yield chunk
        return
    yield from stdin


def _feed_stdin(
    stdin: Stdin, write: Callable[[bytes], Any], close: Callable[[], Any]
) -> threading.Thread:
    """Write stdin from a thread, so a command that talks while it reads cannot deadlock us."""
    errors: list[BaseException] = []

    def pump() -> None:
        try:
            for chunk in _chunks(stdin):
                write(chunk)
        except (BrokenPipeError, OSError, EOFError) as e:
            # The command stopped reading (it exited or closed stdin): its exit code tells.
            errors.append(e)
        finally:
            with contextlib.suppress(OSError, EOFError):
                close()

    thread = threading.Thread(target=pump, name="stdin-pump", daemon=True)
    thread.start()
    return thread


def _source_bytes(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


class CommandTimeout(TransportError):
    pass


# --- streams and agent sessions -------------------------------------------------------


class SessionEnded(TransportError):
    """An agent session ended before it answered: the process exited (`exit_code`:
    BOOTSTRAP refused the agent, it is not installed...) or the connection dropped
    (exit_code -1; `lost` says how). `relay_gone`: what went away was the relay of the
    session (deployer's keeper), not the host's connection or its agent."""

    def __init__(
        self,
        message: str,
        exit_code: int,
        stdout: str,
        stderr: str,
        lost: str = "",
        relay_gone: bool = False,
    ):
        super().__init__(message)
        self.exit_code, self.stdout, self.stderr, self.lost = exit_code, stdout, stderr, lost
        self.relay_gone = relay_gone


# Pieces of stdout (lines, a long one cut at CHUNK) read ahead of their consumer: a
# build printing 200 MB waits for the controller instead of piling up in its memory.
READ_AHEAD = 64


class Stream(ABC):
    """A command running with its pipes open: requests written to its stdin, its
    stdout read line by line (a line longer than CHUNK in pieces) within a deadline,
    its stderr kept (a bounded tail)."""

    def __init__(self) -> None:
        self.lines: queue.Queue[bytes | None] = queue.Queue(maxsize=READ_AHEAD)
        self.err = _Output(None, STREAMED_TAIL)
        self.eof = False
        self.closed = False  # nobody reads any more: the reader stops waiting to hand on
        self.relay_gone = False  # its end was the relay's (the keeper died), not the host's

    def _pump_lines(self, readline: Callable[[int], bytes]) -> None:
        try:
            while line := readline(CHUNK):
                if not self._hand_on(line):
                    return
        except (OSError, EOFError, ValueError):
            pass
        finally:
            self._hand_on(None)

    def _hand_on(self, piece: bytes | None) -> bool:
        """Queue a piece for the consumer, waiting while the queue is full; False
        once the stream is closed (the piece is dropped)."""
        while not self.closed:
            try:
                self.lines.put(piece, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _pump_err(self, read: Callable[[], bytes]) -> None:
        with contextlib.suppress(OSError, EOFError, ValueError):
            while chunk := read():
                self.err.feed(chunk)

    def readline(self, timeout: float | None) -> bytes | None:
        """The next line of stdout; None at its end; CommandTimeout past `timeout`."""
        if self.eof:
            return None
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise CommandTimeout(f"no answer within {timeout:g}s") from None
        if line is None:
            self.eof = True
        return line

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Raises OSError if the command or its connection is gone."""

    def alive(self) -> bool:
        """Still running, as far as can be told without a round trip."""
        if self.eof:
            return False
        with self.lines.mutex:  # answers may wait there (pipelined); its end may not
            return None not in self.lines.queue

    @abstractmethod
    def exit_code(self, wait: float) -> tuple[int, str]:
        """(exit code, "") once stdout ended; (-1, why) if the connection dropped or
        a signal ended the command (no exit status)."""

    @abstractmethod
    def close(self) -> None: ...


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


class AgentSession:
    """The controller's end of one host's `agent session` (deployer/agent/session.py;
    framing: deployer.hostapi.answers): calls answered in order, one request frame
    out and the lines up to its end frame back."""

    def __init__(self, host: str, stream: Stream) -> None:
        self.host = host
        self.stream = stream
        self.next_id = 0
        self.broken = False  # its framing can no longer be trusted: not reused
        self.at_line_start = True  # the next piece of stdout begins a line
        # requests sent ahead of need (pipelined): their words -> id; the call with
        # those words, when it comes next, reads that answer instead of asking again
        self.ahead: dict[tuple[str, ...], int] = {}
        self.received = 0  # the last id whose answer was read (or skipped)

    def send(self, words: list[str], stdin: Stdin = None) -> int:
        """Write one request; its id, for receive(). Requests may be pipelined."""
        payload = b"".join(_chunks(stdin))
        self.next_id += 1
        frame = answers.request_frame(self.next_id, words, payload)
        try:
            if len(frame) <= CHUNK:
                self.stream.write(frame)
            else:  # a pack: written from a thread, so the deadline holds if the host froze
                _feed_stdin(frame, self.stream.write, lambda: None)
        except OSError:
            pass  # the session is gone: receive() says how
        return self.next_id

    def receive(self, request_id: int, on_line: LineCallback | None, timeout: float | None) -> str:
        """The output of request `request_id` up to its end frame (op stream and
        result line). SessionEnded if the session ended first, CommandTimeout if
        nothing ended it within `timeout` (the session is then broken). Only a
        whole line is an end frame: not the tail of a long line read in pieces."""
        out = _Output(on_line, STREAMED_TAIL if on_line is not None else None)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if end is None else max(0.0, end - time.monotonic())
            try:
                raw = self.stream.readline(wait)
            except CommandTimeout:
                self.broken = True
                raise
            if raw is None:
                self.broken = True
                code, lost = self.stream.exit_code(2.0)
                text = out.text()
                raise SessionEnded(
                    f"{self.host}: the agent session ended (exit {code}) {lost}".rstrip(),
                    code,
                    text,
                    self.stream.err.text(),
                    lost,
                    self.stream.relay_gone,
                )
            whole = self.at_line_start and raw.endswith(b"\n")
            self.at_line_start = raw.endswith(b"\n")
            line = raw.decode("utf-8", "replace")
            closed = answers.end_id(line.rstrip("\n")) if whole else None
            if closed is not None:
                self.received = closed
            if closed == request_id:
                return out.text()
            if closed is not None:  # an earlier request's answer nobody waited for
                out = _Output(on_line, out.keep)
                continue
            out.feed(raw)

    def send_ahead(self, words: list[str]) -> None:
        """Send a request (no stdin) now, for a call with these very words later."""
        self.ahead[tuple(words)] = self.send(words)

    def call(
        self,
        words: list[str],
        stdin: Stdin = None,
        on_line: LineCallback | None = None,
        timeout: float | None = None,
    ) -> str:
        rid = self.ahead.pop(tuple(words), None) if stdin is None else None
        # an answer sent ahead is only good if nothing else ran on the session since
        if rid is None or rid != self.received + 1:
            rid = self.send(words, stdin)
        out = self.receive(rid, on_line, timeout)
        self.ahead = {w: r for w, r in self.ahead.items() if r > rid}
        return out

    def close(self) -> None:
        self.stream.close()


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
            _feed_stdin(stdin, proc.stdin.write, proc.stdin.close)
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


def _drain(stream: IO[bytes], sink: _Output) -> None:
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
            _feed_stdin(stdin, chan.sendall, chan.shutdown_write)
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
