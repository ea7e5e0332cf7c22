"""`deployer exec`: a command in the app's environment on every host (agent call
`exec`), or on one with a terminal (`-it`, a PTY over the SSH channel)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from deployer.bundle import build
from deployer.errors import DeployerError
from deployer.hostapi import answers, calls
from deployer.remote import RemoteHost
from deployer.report import Prefixer, short_error
from deployer.session import FleetSession
from deployer.transport import LocalHost, Result


def _exec_argv(remote: RemoteHost, argv: Sequence[str]) -> list[str]:
    """With roles, the environment is the first (selected) role's master's."""
    role = next((r.name for r in remote.config.masters), None)
    call = calls.exec_command(argv, role)
    return call.argv(remote.config.ssh.python, remote.layout, build().sha256)


def _why_not_run(remote: RemoteHost, result: Result) -> str | None:
    """Why the agent did not run the command (a refusal, no agent), None if it ran."""
    tail = result.stdout.rstrip("\n").rsplit("\n", 1)[-1]
    if tail.startswith(answers.RESULT_MARK):
        try:
            answers.parse_result(tail, answers.ExecResult)
        except answers.AgentFailed as e:
            return str(e)
        except ValueError:
            pass
    return calls.bootstrap_refusal(result.exit_code, result.stderr_tail(5), str(remote.layout.pyz))


def run_exec(
    session: FleetSession, argv: Sequence[str], parallel: int | None, out: TextIO, err: TextIO
) -> int:
    """`deployer exec`: argv in current/ on every host, `HOST: ` before each line of
    its output; 0 only if it exited 0 on every host, else 1, saying where not."""
    show = Prefixer(session.names, out)
    lock = threading.Lock()

    def one(remote: RemoteHost) -> tuple[int | None, str | None]:
        def line(text: str) -> None:
            if not text.startswith(answers.RESULT_MARK):
                with lock:
                    out.write(show(remote.name, text) + "\n")
                    out.flush()

        try:
            result = remote.transport.run(_exec_argv(remote, argv), on_stdout=line)
        except DeployerError as e:
            return None, short_error(e, remote.name)
        if result.exit_code == 0:
            return 0, None
        why = _why_not_run(remote, result)
        if why is not None:
            return None, why
        with lock:
            for text in result.stderr.splitlines()[-20:]:
                err.write(show(remote.name, text) + "\n")
        return result.exit_code, None

    results, _ = session.each(session.names, one, limit=parallel)  # None: [rollout] parallel
    failed = []
    for name in session.names:
        code, why = results.get(name, (None, "no result"))
        if why is not None:
            err.write(show(name, f"FAILED: {why}") + "\n")
            failed.append(f"{name} (did not run)")
        elif code != 0:
            failed.append(f"{name} (exit {code})")
    if failed:
        total = len(session.names)
        err.write(
            f"deployer exec: failed on {len(failed)} of {total} host(s): {', '.join(failed)}\n"
        )
    err.flush()
    return 1 if failed else 0


def run_interactive(session: FleetSession, argv: Sequence[str]) -> int:
    """`deployer exec -i`: a console on one host, on a TTY there (like `ssh -t`);
    the command's exit code is said when it is not 0."""
    [name] = session.names
    remote = session.remotes[name]
    full = _exec_argv(remote, argv)
    if isinstance(remote.transport, LocalHost):  # this machine: our terminal is the TTY
        import subprocess

        code = subprocess.call(full)
    else:
        code = _pty_session(remote, full)
    if code != 0:
        sys.stderr.write(f"deployer exec: {name}: exit {code}\n")
        return 1
    return 0


def _pty_session(remote: RemoteHost, full: list[str]) -> int:
    import select
    import shutil
    import signal

    from deployer.errors import TransportError
    from deployer.transport import command_line

    conn = remote.transport.connection()  # type: ignore[attr-defined]
    chan = conn.transport.open_session(timeout=remote.config.ssh.connect_timeout)
    size = shutil.get_terminal_size()
    chan.get_pty(term=os.environ.get("TERM", "vt100"), width=size.columns, height=size.lines)
    chan.exec_command(command_line(full))
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    saved = None
    if os.isatty(fd_in):
        import termios
        import tty

        saved = termios.tcgetattr(fd_in)
        tty.setraw(fd_in)

    def resized(signum: int, frame: object) -> None:
        s = shutil.get_terminal_size()
        chan.resize_pty(width=s.columns, height=s.lines)

    old_winch = signal.signal(signal.SIGWINCH, resized)
    tail = b""
    try:
        reading = True
        while True:
            ready, _, _ = select.select([chan, *([fd_in] if reading else [])], [], [], 1.0)
            if chan in ready or chan.recv_ready():
                data = chan.recv(32768)
                if not data:
                    break
                tail = (tail + data)[-4096:]
                _write_all(fd_out, data)
            if reading and fd_in in ready:
                data = os.read(fd_in, 4096)
                if data:
                    chan.sendall(data)
                else:
                    reading = False
                    chan.shutdown_write()
            if chan.closed:
                break
        if not chan.exit_status_ready() and not chan.get_transport().is_active():
            raise TransportError(f"{remote.name}: connection lost during the session")
        code = chan.recv_exit_status()
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        if saved is not None:
            import termios

            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
        chan.close()
    text = tail.decode(errors="replace").replace("\r", "").rstrip("\n").rsplit("\n", 1)[-1]
    if code != 0 and text.startswith(answers.RESULT_MARK):
        try:
            answers.parse_result(text, answers.ExecResult)
        except answers.AgentFailed as e:
            raise DeployerError(f"{remote.name}: could not run the command: {e}") from None
        except ValueError:
            pass
    return code


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
