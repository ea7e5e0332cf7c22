"""Hostile output from a build and a changed host key, over real sshd hosts (issue 15):
control characters never reach the terminal raw, a build that prints without end
does not fill the controller's memory, and the changed-key hint is a command that
works as printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rollout_helpers import Project, make_project
from sshd import SSHDFleet, SSHTestHost
from test_transport import host_config

from deployer.agent_session import STREAMED_TAIL
from deployer.ssh import HostKeyRefused, SSHHost, known_hosts_name
from deployer.transport import LocalHost

# OSC (retitle the window) ending in BEL, clear screen, cursor up, a C1 CSI (U+009B)
# and a form feed: each would act on a terminal
ESCAPES = r"\033]0;owned\007\033[2J\033[1Afake: rollout ok\302\23331m\014"
# A build printing more than the controller may hold (it once kept it all: 329 MB for
# 200 MB). 120 MB: above the bound below, and a rollout of it fits the timeout on a
# loaded 2-core machine (200 MB did not, beside another suite).
BUILD_MB = 120
PEAK_MB = 100  # measured ~55 MB


def test_build_output_reaches_the_terminal_with_visible_escapes(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    build = f"printf '{ESCAPES}\\n'; printf 'last words {ESCAPES}\\n'; exit 3"
    project = make_project(
        tmp_path, ssh_hosts[:1], {"a.txt": "1\n"}, f"build = {json.dumps(build)}"
    )
    project.deployer("setup", check=True)
    proc = project.deployer("rollout")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "FAILED at prepare" in proc.stdout, out
    assert "Traceback" not in out
    for raw in ("\x1b", "\x07", "\x9b", "\x0c"):
        assert raw not in out, (raw, out)
    shown = "\\x1b]0;owned\\x07\\x1b[2J\\x1b[1Afake: rollout ok\\x9b31m\\x0c"
    assert f"build: {shown}" in proc.stdout  # streamed as the build ran
    assert f"last words {shown}" in out  # and in the failure's last lines


def test_changed_host_key_hint_removes_the_bracketed_host_port_entry(
    sshd_fleet: SSHDFleet, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[1]
    sshd_fleet.restart(h, new_host_key=True)  # h.known_hosts still has the old key
    with pytest.raises(HostKeyRefused) as e:
        SSHHost(host_config(h)).run(["true"])
    message = str(e.value)
    assert f"ssh-keygen -R '[{h.address}]:{h.port}'" in message, message
    command = re.search(r"`(ssh-keygen -R [^`]+)`", message)
    assert command is not None, message
    subprocess.run(command.group(1), shell=True, check=True, capture_output=True)
    # the old key is gone: the new one is accepted as a new host's, when trusted
    again = SSHHost(host_config(h, trust_new_hosts=True))
    assert again.run(["echo", "ok"]).stdout == "ok\n"
    again.close()
    assert known_hosts_name("10.0.0.1", 22) == "10.0.0.1"
    assert known_hosts_name("10.0.0.1", 2222) == "[10.0.0.1]:2222"


def peak_rss_mb(project: Project, *args: str) -> tuple[int, float]:
    """`deployer ARGS` as a child of a fresh Python: (exit code, its peak RSS in MB).
    A fresh parent, so RUSAGE_CHILDREN holds this run alone."""
    argv = [sys.executable, "-m", "deployer", "-i", str(project.inventory), *args]
    measure = (
        "import resource, subprocess, sys\n"
        f"code = subprocess.run({argv!r}, stdout=subprocess.DEVNULL).returncode\n"
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    env = {**os.environ, "DEPLOYER_STATE_DIR": str(project.state)}
    proc = subprocess.run(
        [sys.executable, "-c", measure],
        capture_output=True,
        text=True,
        cwd=project.repo,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    code, kb = proc.stdout.split()
    return int(code), int(kb) / 1024


@pytest.mark.timeout(600)
def test_a_build_printing_more_than_the_bound_keeps_the_controller_small(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    build = f"yes {'x' * 40} | head -c {BUILD_MB * 1000 * 1000}"
    project = make_project(tmp_path, ssh_hosts[:1], {"a.txt": "1\n"}, f'build = "{build}"')
    project.deployer("setup", check=True)
    code, peak = peak_rss_mb(project, "rollout")
    print(f"controller peak RSS with a {BUILD_MB} MB build: {peak:.0f} MB")
    assert code == 0
    assert project.current(project.hosts[0]) is not None
    assert peak < PEAK_MB < BUILD_MB, f"{peak:.0f} MB"


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_streamed_output_keeps_a_bounded_tail_with_the_last_line(
    kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        host: LocalHost | SSHHost = LocalHost()
    else:
        host = SSHHost(host_config(request.getfixturevalue("ssh_hosts")[0]))
    lines = 300_000  # 30 MB
    code = f"import sys\nfor _ in range({lines}): sys.stdout.write('y' * 99 + '\\n')\nprint('last')"
    seen = []
    result = host.run(["python3", "-c", code], on_stdout=lambda s: seen.append(len(s)), check=True)
    host.close()
    assert len(seen) == lines + 1 and seen[-1] == 4  # every line streamed
    assert len(result.stdout) <= 2 * STREAMED_TAIL  # but only a tail kept
    assert result.stdout.endswith("y\nlast\n") and result.stdout.startswith("y" * 99 + "\n")
    unstreamed = host.run(["python3", "-c", code], check=True)  # no callback: all of it
    host.close()
    assert len(unstreamed.stdout) == lines * 100 + 5
