"""Host transports: the same behaviour from LocalHost and from SSHHost over real sshd."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
import tomllib
from pathlib import Path

import pytest
from sshd import SSHTestHost, inventory_toml

from deployer import inventory
from deployer.agent_session import CommandTimeout
from deployer.errors import CommandFailed, TransportError
from deployer.ssh import Backoff, SSHHost
from deployer.transport import LocalHost, command_line

# Every character a shell would act on: a test that these arrive intact proves
# nothing between us and the program parsed them.
NASTY = [
    "two words",
    "it's",
    'say "hi"',
    "$HOME",
    "${PATH}",
    "a;b",
    "`id`",
    "$(id)",
    "x|y&z",
    "*",
    "~",
    "",
    "back\\slash",
    "new\nline",
    "tab\there",
    "#hash",
    "> out",
]
ECHO_ARGS = "import json, sys; print(json.dumps(sys.argv[1:]))"


def python_on(host) -> str:
    return "python3" if not isinstance(host, LocalHost) else sys.executable


def test_command_line_quotes_each_word_once() -> None:
    line = command_line(["printf", "%s", *NASTY], cwd="/a b", env={"K": "v w"})
    assert line.startswith("cd '/a b' && env 'K=v w' printf")
    assert shlex.split(line.split(" && ", 1)[1])[4:] == NASTY


def test_arguments_reach_the_program_intact(host) -> None:
    result = host.run([python_on(host), "-c", ECHO_ARGS, *NASTY], check=True)
    assert json.loads(result.stdout) == NASTY


def test_cwd_and_env_with_spaces(host, remote_dir: str) -> None:
    odd = f"{remote_dir}/dir with 'quotes' and $dollar"
    host.run(["mkdir", "-p", odd], check=True)
    code = "import os; print(os.getcwd()); print(os.environ['ODD'])"
    result = host.run([python_on(host), "-c", code], cwd=odd, env={"ODD": "a;b `c` $d"})
    assert result.stdout.splitlines() == [odd, "a;b `c` $d"]


def test_exit_code_stderr_and_check(host) -> None:
    code = "import sys; print('out'); print('line1\\nboom', file=sys.stderr); sys.exit(3)"
    result = host.run([python_on(host), "-c", code])
    assert (result.exit_code, result.stdout, result.ok) == (3, "out\n", False)
    with pytest.raises(CommandFailed) as e:
        result.check()
    message = str(e.value)
    assert host.name in message and "exited with 3" in message and "boom" in message
    assert e.value.exit_code == 1


def test_missing_program_is_a_failed_command(host) -> None:
    result = host.run(["no-such-program-xyz", "arg"])
    assert result.exit_code == 127


def test_stdin_bytes_and_stream(host) -> None:
    copy = "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    result = host.run(
        [python_on(host), "-c", "import sys; print(len(sys.stdin.buffer.read()))"], stdin=data
    )
    assert result.stdout.strip() == str(len(data))
    result = host.run([python_on(host), "-c", copy], stdin=iter([b"abc", b"def\n"]))
    assert result.stdout == "abcdef\n"


def test_no_stdin_means_eof_not_a_hang(host) -> None:
    result = host.run(["cat"], timeout=10)
    assert result.ok and result.stdout == ""


def test_stdout_lines_stream_while_the_command_runs(host) -> None:
    code = (
        "import sys, time\n"
        "for i in range(3):\n    print(f'line {i}', flush=True); time.sleep(0.3)\n"
        "sys.stdout.write('tail')"
    )
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    result = host.run(
        [python_on(host), "-c", code], on_stdout=lambda s: seen.append((time.monotonic(), s))
    )
    assert [s for _, s in seen] == ["line 0", "line 1", "line 2", "tail"]
    assert seen[0][0] - start < seen[-1][0] - start - 0.4  # the first came well before the end
    assert result.stdout == "line 0\nline 1\nline 2\ntail"


def test_timeout(host) -> None:
    with pytest.raises(CommandTimeout, match="did not finish within 0.5s"):
        host.run(["sleep", "30"], timeout=0.5)
    assert host.run(["true"]).ok  # the host is still usable


def test_put_bytes_and_file(host, remote_dir: str, tmp_path: Path) -> None:
    target = f"{remote_dir}/file with space.txt"
    host.put(b"first\n", target)
    local = tmp_path / "src.bin"
    local.write_bytes(b"\x00second\xff")
    host.put(local, target, mode=0o600)
    out = host.run([python_on(host), "-c", _STAT, target], check=True).stdout.split()
    assert out == ["0o600", "AHNlY29uZP8="]  # base64 of b"\x00second\xff"
    listing = host.run(["ls", "-a", remote_dir], check=True).stdout.split("\n")
    assert not [n for n in listing if ".tmp" in n or n.startswith(".file")]


_STAT = (
    "import base64, os, sys; p = sys.argv[1]; "
    "print(oct(os.stat(p).st_mode & 0o777), base64.b64encode(open(p, 'rb').read()).decode())"
)


def test_put_into_missing_directory_is_a_clear_error(host, remote_dir: str) -> None:
    with pytest.raises(TransportError, match=r"could not put .*/no/such/dir/file: "):
        host.put(b"x", f"{remote_dir}/no/such/dir/file")


def test_backoff_delays_grow_with_jitter_within_deadline() -> None:
    import random

    delays = list(Backoff(deadline=6.0, rng=random.Random(1)).delays())
    assert 0.2 <= delays[0] <= 0.3 and 0.4 <= delays[1] <= 0.6 and 0.8 <= delays[2] <= 1.2
    assert all(d <= 2.4 for d in delays) and sum(delays) <= 6.0


def host_config(test_host: SSHTestHost, **ssh: object) -> inventory.Host:
    """The inventory entry for a test sshd host, with [ssh] keys overridden."""
    app = f'[app]\nname = "t"\ndeploy_to = "{test_host.root}"\n'
    config = inventory.parse(tomllib.loads(inventory_toml([test_host], app))).hosts[test_host.name]
    return dataclasses.replace(config, ssh=dataclasses.replace(config.ssh, **ssh))


@pytest.fixture(params=["local", "ssh"])
def host(request: pytest.FixtureRequest):
    if request.param == "local":
        yield LocalHost("local")
        return
    ssh_host = SSHHost(host_config(request.getfixturevalue("ssh_hosts")[0]))
    yield ssh_host
    ssh_host.close()


@pytest.fixture
def remote_dir(host, request: pytest.FixtureRequest) -> str:
    if isinstance(host, LocalHost):
        return str(request.getfixturevalue("tmp_path"))
    return str(request.getfixturevalue("ssh_hosts")[0].root)
