"""`deployer master` bad input: exit 2, a message naming the option and what
was expected, never a traceback. Plus `unit` and client errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from master_helpers import PYTHON, PYTHON_APP, free_port, master_cli

from deployer.master.cli import main

APP = [PYTHON, str(PYTHON_APP)]


def run_args(*options: str, command: list[str] | None = APP) -> list[str]:
    argv = ["run", "--listen", f"127.0.0.1:{free_port()}", *options]
    return argv + (["--", *command] if command is not None else [])


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            run_args("--stop-signal", "SIGFOO"),
            "--stop-signal: expected one of SIGTERM, SIGINT, SIGQUIT",
        ),
        (
            run_args("--workers", "0"),
            "--workers: expected a positive integer (at most 1024) or 'auto', got '0'",
        ),
        (
            run_args("--workers", "many"),
            "--workers: expected a positive integer (at most 1024) or 'auto', got 'many'",
        ),
        (
            run_args("--ready", "sometimes"),
            "--ready: expected one of notify, pipe or delay:SECONDS, got 'sometimes'",
        ),
        (run_args("--ready-timeout", "-1"), "--ready-timeout: expected a number of seconds > 0"),
        (
            run_args("--listen-fds", "0"),
            "--listen-fds: expected an integer >= 1 and <= 64, got '0'",
        ),
        (
            run_args("--listen-fds", "65"),
            "--listen-fds: expected an integer >= 1 and <= 64, got '65'",
        ),
        (run_args(command=None), "missing command: give it after --"),
        (run_args(command=["no-such-program-xyz"]), "command: 'no-such-program-xyz' not found"),
        (run_args("--cwd", "/nonexistent/dir"), "--cwd: /nonexistent/dir is not a directory"),
        (["run", "--listen", "nowhere", "--", *APP], "--listen: expected HOST:PORT"),
        (["unit", "--socket-unit", "--", *APP], "--socket-unit: needs --listen"),
        (["run", "--bogus", "--", *APP], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["status"], "--socket PATH is required"),
        (
            ["scale", "zero", "--socket", "/tmp/x"],
            "scale N: expected an integer >= 1 and <= 1024, got 'zero'",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.timeout(30)
def test_busy_port_exits_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = master_cli("run", "--listen", f"127.0.0.1:{port}", "--", *APP)
    assert r.returncode == 2
    assert f"--listen: cannot bind 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(30)
def test_bad_config_file_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text('[master]\nworkers = 2\nlisten = "127.0.0.1:1"\nstop_sginal = "TERM"\n')
    assert main(["run", "--config", str(cfg), "--", *APP]) == 2
    assert f"{cfg}: [master] stop_sginal: unknown key" in capsys.readouterr().err
    cfg.write_text("[master]\nworkers = 0\n")
    assert main(["run", "--config", str(cfg), "--", *APP]) == 2
    assert "[master] workers: expected a positive integer" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_client_without_a_master_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--socket", str(tmp_path / "none.sock")]) == 1
    assert "no master socket at" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_unit_prints_a_notify_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text(
        '[master]\ncommand = "node app.js"\nworkers = 2\nlisten = "127.0.0.1:8000"\n'
        'cwd = "current"\nsocket = "run/master.sock"\nready = "pipe"\n'
    )
    assert main(["unit", "--config", str(cfg), "--socket-unit"]) == 0
    out = capsys.readouterr().out
    assert "Type=notify" in out and "KillMode=mixed" in out
    assert f"--cwd {tmp_path}/current" in out and "--ready pipe" in out
    reload = f"ExecReload={PYTHON} -m deployer.master reload --wait"
    assert f"{reload} --socket {tmp_path}/run/master.sock" in out
    assert "ListenStream=127.0.0.1:8000" in out
    assert "-- /bin/sh -c 'exec node app.js'" in out  # a string command runs through sh


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "reload" in capsys.readouterr().out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["run", "start", "status", "reload", "stop", "upgrade"])
def test_too_long_socket_path_exits_2_naming_the_limit(tmp_path: Path, command: str) -> None:
    path = tmp_path / ("s" * 60) / ("m" * 60 + ".sock")
    path.parent.mkdir()
    port = free_port()
    server = ["--listen", f"127.0.0.1:{port}", "--", *APP] if command in ("run", "start") else []
    r = master_cli(command, "--socket", str(path), *server)
    assert r.returncode == 2, r.stdout + r.stderr
    size = len(str(path).encode())
    assert f"--socket: {path} is {size} bytes, longer than the 107-byte limit" in r.stderr
    assert "None" not in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as probe:  # run/start bound nothing they kept
        probe.bind(("127.0.0.1", port))
