"""Agent sessions: one long-running agent process a host, its requests framed by
the host contract (deployer.hostapi.answers), over a `Stream`, whatever carries
it (a local process, an SSH channel, the keeper's relay); and the pool of a
host's idle sessions, reused call after call. The transports (deployer.transport)
and the keeper (deployer.keeper) share it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from deployer.errors import DeployerError, TransportError
from deployer.hostapi import answers

LineCallback = Callable[[str], None]
Stdin = bytes | str | IO[bytes] | Iterable[bytes] | None

CHUNK = 64 * 1024
STREAMED_TAIL = 1 << 20  # bytes of a streamed command's output kept for its Result
MAX_LINE = 1 << 20  # a longer line reaches the line callback in parts


# --- output and input -------------------------------------------------------------------


class Output:
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


def chunks(stdin: Stdin) -> Iterator[bytes]:
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


def feed_stdin(
    stdin: Stdin, write: Callable[[bytes], Any], close: Callable[[], Any]
) -> threading.Thread:
    """Write stdin from a thread, so a command that talks while it reads cannot deadlock us."""
    errors: list[BaseException] = []

    def pump() -> None:
        try:
            for chunk in chunks(stdin):
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


# --- streams and agent sessions -------------------------------------------------------


class CommandTimeout(TransportError):
    pass


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
        self.err = Output(None, STREAMED_TAIL)
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
        payload = b"".join(chunks(stdin))
        self.next_id += 1
        frame = answers.request_frame(self.next_id, words, payload)
        try:
            if len(frame) <= CHUNK:
                self.stream.write(frame)
            else:  # a pack: written from a thread, so the deadline holds if the host froze
                feed_stdin(frame, self.stream.write, lambda: None)
        except OSError:
            pass  # the session is gone: receive() says how
        return self.next_id

    def receive(self, request_id: int, on_line: LineCallback | None, timeout: float | None) -> str:
        """The output of request `request_id` up to its end frame (op stream and
        result line). SessionEnded if the session ended first, CommandTimeout if
        nothing ended it within `timeout` (the session is then broken). Only a
        whole line is an end frame: not the tail of a long line read in pieces."""
        out = Output(on_line, STREAMED_TAIL if on_line is not None else None)
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
                out = Output(on_line, out.keep)
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


# --- a host's idle sessions ---------------------------------------------------------------

_SESSIONS_INIT = threading.Lock()


class SessionPool(ABC):
    """A host's agent sessions: idle ones are reused; a caller that finds none idle
    (the lock heartbeat while a prepare runs) gets one of its own, unless one is
    being opened (open_ahead): it waits for that one."""

    name: str

    @abstractmethod
    def open_stream(self, argv: list[str] | tuple[str, ...]) -> Stream:
        """Start argv with stdin, stdout and stderr open (an agent session)."""

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
