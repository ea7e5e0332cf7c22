"""Failure messages that point at the cause (issue 24.7), on real sshd hosts: each
says what went wrong where, once, with the exit code DESIGN.md gives it."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from master_helpers import free_port
from rollout_helpers import APP, commit, make_project, master_extra, serving, stop_masters
from sshd import SSHTestHost


def summary(out: str) -> str:
    """The failure summary a failed rollout ends with (after `rollout FAILED at`)."""
    assert "rollout FAILED at" in out, out
    plain = re.sub(r"^\d\d:\d\d:\d\d ", "", out, flags=re.MULTILINE)  # the time stamps
    return plain.split("rollout FAILED at", 1)[1]


def test_a_host_without_the_agent_says_so_once_and_exits_2(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    p = make_project(tmp_path, ssh_hosts[:1], {"app.py": APP}, extra=master_extra(free_port()))
    proc = p.deployer("rollout")  # no `deployer setup` before it
    pyz = ssh_hosts[0].root / ".deployer" / "deployer.pyz"
    said = f"host1: lock failed: the host agent is not installed at {pyz}: run `deployer setup`"
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"deployer: {said}"
    assert f"verdict: FAILED (exit 2): {said}" in proc.stdout
    assert "lock failed: lock failed" not in proc.stdout + proc.stderr


def test_a_port_nothing_listens_on_is_said_to_refuse(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[0]
    p = make_project(tmp_path, [h], {"app.py": APP})
    closed = free_port()  # bound and let go: nothing listens there
    p.inventory.write_text(
        p.inventory.read_text().replace(f"port = {h.port}\n", f"port = {closed}\n")
    )
    refused = f"connection refused at {h.address}:{closed} (no sshd listening?"
    started = time.monotonic()
    proc = p.deployer("status")
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"host1: NOT OK\n  - {refused}"), proc.stdout
    assert "no answer within" not in proc.stdout
    assert took < 6.5, took  # retried briefly, well within status's 5 s + 2
    proc = p.deployer("rollout")
    assert proc.returncode == 1
    assert f"deployer: host1: {refused}" in proc.stderr, proc.stderr


SIGNAL = {
    "notify": 'it must send READY=1 to the datagram socket in $NOTIFY_SOCKET (ready = "notify")',
    "pipe": 'it must write READY=1 to the pipe whose fd is in $DEPLOYER_READY_FD (ready = "pipe")',
}


@pytest.mark.parametrize("mode", ["notify", "pipe"])
def test_a_worker_never_ready_is_told_how_its_mode_signals(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], mode: str
) -> None:
    extra = master_extra(free_port()).replace('ready = "notify"', f'ready = "{mode}"')
    extra = extra.replace("ready_timeout = 10", "ready_timeout = 2")
    with serving(tmp_path, ssh_hosts[:1], {"app.py": APP}, extra) as p:
        commit(p.repo, {"release.env": "NEVER_READY=1\n"}, "v2 never says it is ready")
        proc = p.deployer("rollout")
    assert proc.returncode == 1, proc.stdout
    why = summary(proc.stdout)
    assert f"not ready within ready_timeout (2s): {SIGNAL[mode]}" in why, proc.stdout


@pytest.mark.parametrize(
    ("switch", "master"), [("FAIL_HEALTH", "running"), ("CRASH_AT_BOOT", "not running")]
)
def test_a_failed_first_deploy_says_where_it_left_the_host(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], switch: str, master: str
) -> None:
    h = ssh_hosts[0]
    files = {"app.py": APP, "release.env": f"{switch}=1\n"}
    p = make_project(tmp_path, [h], files, extra=master_extra(free_port()))
    try:
        p.deployer("setup", check=True)
        proc = p.deployer("rollout")
        release = p.current(h)
        running = p.deployer("status", "--json").stdout
    finally:
        stop_masters([h])
    assert proc.returncode == 1, proc.stdout
    assert release is not None
    left = f"left on {release}, its master {master}"
    assert f"no previous release to go back to: {left}" in proc.stdout
    assert "rollout FAILED at switch after" in proc.stdout
    assert f": host1 had no previous release: {left}\n" in proc.stdout, proc.stdout
    assert "rolled back" not in proc.stdout  # nothing was
    assert f'"master_running": {"true" if master == "running" else "false"}' in running


# An app that ignores the socket the master hands it as fd 3: it says it is ready,
# then (BIND_AFTER seconds later) binds OWN_ADDRESS itself and serves there.
OWN_SOCKET = r"""
import http.server, os, socket, time
notify = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", "\0" + notify[1:] if notify.startswith("@") else notify)
time.sleep(float(os.environ.get("BIND_AFTER", "0")))
host, port = os.environ["OWN_ADDRESS"].rsplit(":", 1)
server = http.server.HTTPServer((host, int(port)), http.server.BaseHTTPRequestHandler)
print("serving on %s:%d" % server.server_address, flush=True)
server.serve_forever()
"""
FD3 = (
    "an app under the master must serve the socket it inherits as fd 3 (LISTEN_FDS=1), "
    "not bind its own"
)


def own_socket_rollout(tmp_path: Path, host: SSHTestHost, env: str) -> tuple[str, str]:
    """A first rollout of OWN_SOCKET with [env] `env`: its output, and the release."""
    port = free_port()
    env = env.replace("PORT", str(port))
    p = make_project(tmp_path, [host], {"app.py": OWN_SOCKET}, extra=master_extra(port) + env)
    try:
        p.deployer("setup", check=True)
        proc = p.deployer("rollout")
    finally:
        stop_masters([host])
    assert proc.returncode == 1, proc.stdout
    release = p.current(host)
    assert release is not None
    return summary(proc.stdout), release


def test_workers_binding_the_masters_address_crash_and_are_shown(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[0]
    env = f'[env]\nOWN_ADDRESS = "{h.address}:PORT"\nBIND_AFTER = "1"\n'
    why, release = own_socket_rollout(tmp_path, h, env)
    assert "health check" in why and "no answer" in why, why
    assert f"the workers of {release} exited " in why, why
    assert "time(s), last exited with code 1 at " in why, why
    assert f"] OSError: [Errno 98] Address already in use\n  {FD3}\n" in why, why


def test_workers_serving_elsewhere_are_shown_with_the_fd3_hint(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[0]
    why, release = own_socket_rollout(tmp_path, h, '[env]\nOWN_ADDRESS = "127.0.0.1:0"\n')
    assert "health check" in why and "no answer" in why, why
    assert f"\n  no worker of {release} exited (2 of 2 ready); their last lines:\n" in why, why
    assert why.count("\n    [worker ") == why.count("] serving on 127.0.0.1:") == 2, why
    assert f"serving on 127.0.0.1:{why.split('127.0.0.1:')[-1].split()[0]}\n  {FD3}\n" in why


def test_a_reload_failing_on_address_in_use_gets_the_fd3_hint(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[0]
    port = free_port()
    extra = master_extra(port) + f'[env]\nOWN_ADDRESS = "{h.address}:{port}"\n'
    with serving(tmp_path, [h], {"app.py": APP}, extra) as p:
        commit(p.repo, {"app.py": OWN_SOCKET}, "v2 binds the master's address itself")
        proc = p.deployer("rollout")
    assert proc.returncode == 1, proc.stdout
    why = summary(proc.stdout)
    assert "master reload failed" in why, why
    assert f"OSError: [Errno 98] Address already in use\n  {FD3}\n" in why, why
