"""A host to run commands on: `Transport` (run a command, stream stdin and stdout,
put a file) and its local kind, `LocalHost`; the SSH kind is deployer.ssh.

Commands are argument lists. Quoting happens in exactly one place,
`command_line()`, and only for SSH, where the remote login shell parses the
line; a local command runs without any shell.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import threading
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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

Source = bytes | str | os.PathLike[str]  # file content, or a local path to read it from

STDERR_TAIL_LINES = 20


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


def outputs(cmd: Command) -> tuple[Output, Output]:
    """stdout and stderr collectors; bounded tails when stdout is streamed."""
    keep = STREAMED_TAIL if cmd.on_stdout is not None else None
    return Output(cmd.on_stdout, keep), Output(None, keep)


def source_bytes(source: Source) -> bytes:
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
        out, err = outputs(cmd)
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
                fh.write(source_bytes(source))
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
