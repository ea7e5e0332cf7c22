"""The real-SSH test hosts themselves, checked with the real OpenSSH client."""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor

import pytest
from sshd import SSHDFleet, SSHTestHost, deploy_to_template, port_accepts

from deployer import inventory


def ssh(host: SSHTestHost, command: str, timeout: float = 20, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        host.ssh_argv(command, **kw), capture_output=True, text=True, timeout=timeout
    )


def host_key_fingerprint_seen(host: SSHTestHost) -> str:
    """The fingerprint the server presents, read with ssh-keyscan (not from our files)."""
    scan = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(host.port), host.address],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", "-"], input=scan.stdout,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return listed.stdout.split()[1]


def test_login_works_on_every_host(ssh_hosts: list[SSHTestHost]) -> None:
    assert [h.address for h in ssh_hosts] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert len({(h.address, h.port) for h in ssh_hosts}) == 3
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda h: ssh(h, "echo ok"), ssh_hosts))
    for h, r in zip(ssh_hosts, results, strict=True):
        assert (r.returncode, r.stdout, r.stderr) == (0, "ok\n", ""), h


def test_environment_is_clean(ssh_hosts: list[SSHTestHost]) -> None:
    r = ssh(ssh_hosts[0], "env; echo ---; python3 --version; command -v python3")
    assert r.returncode == 0, r.stderr
    env_text, _, python = r.stdout.partition("---\n")
    env = dict(line.split("=", 1) for line in env_text.splitlines() if "=" in line)
    # root's ~/.bashrc (pyenv init) must not run: slow, and it writes into ~/.pyenv
    assert not [k for k in env if "PYENV" in k], env
    assert "pyenv" not in env["PATH"], env["PATH"]
    assert env["HOME"] != "/root"
    assert env["USER"] == ssh_hosts[0].user
    # the client's LANG/LC_* (SendEnv in /etc/ssh/ssh_config) are not accepted
    assert not [k for k in env if k.startswith("LC_")], env
    if os.geteuid() == 0:
        assert env["USER"] == "deployer-test"
        assert env["SHELL"] == "/bin/sh"
    assert python.startswith("Python 3."), python
    assert r.stderr == ""


def test_deploy_roots_are_fresh_and_writable(ssh_hosts: list[SSHTestHost]) -> None:
    for h in ssh_hosts:
        assert h.root.is_dir() and not any(h.root.iterdir())
        r = ssh(h, f"mkdir {h.root}/releases && echo {h.name} > {h.root}/releases/who && id -un")
        assert r.returncode == 0, r.stderr
        assert (h.root / "releases" / "who").read_text() == f"{h.name}\n"
        assert (h.root / "releases").stat().st_uid == h.root.stat().st_uid
    assert deploy_to_template(ssh_hosts).replace("{host}", "host1") == str(ssh_hosts[0].root)


def test_each_test_gets_new_roots(ssh_hosts: list[SSHTestHost], sshd_fleet: SSHDFleet) -> None:
    again = sshd_fleet.fresh_copies(ssh_hosts)
    assert {h.root for h in again}.isdisjoint(h.root for h in ssh_hosts)
    assert [(h.address, h.port) for h in again] == [(h.address, h.port) for h in ssh_hosts]
    assert again[0].known_hosts != ssh_hosts[0].known_hosts


def test_known_hosts_lists_every_host(ssh_hosts: list[SSHTestHost]) -> None:
    lines = ssh_hosts[0].known_hosts.read_text().splitlines()
    assert lines == [h.known_hosts_line for h in ssh_hosts]
    for h in ssh_hosts:
        assert h.known_hosts_line.startswith(f"[{h.address}]:{h.port} ssh-ed25519 ")
        assert host_key_fingerprint_seen(h) == h.host_key_fingerprint


def test_unknown_host_is_refused_by_strict_client(ssh_hosts: list[SSHTestHost], tmp_path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = ssh(ssh_hosts[0], "echo ok", known_hosts=empty)
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr


def test_sftp_subsystem(ssh_hosts: list[SSHTestHost], tmp_path) -> None:
    h = ssh_hosts[1]
    src = tmp_path / "payload"
    src.write_bytes(b"x" * 100_000)
    argv = h.ssh_argv()
    # same options as ssh, minus the destination; sftp takes -P for the port
    options = argv[1 : argv.index("-p")]
    r = subprocess.run(
        ["sftp", *options, "-P", str(h.port), "-b", "-", f"{h.user}@{h.address}"],
        input=f"put {src} {h.root}/payload\n", capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (h.root / "payload").read_bytes() == src.read_bytes()


def test_many_parallel_connections(ssh_hosts: list[SSHTestHost]) -> None:
    # deploys open a connection per host and several sessions each: MaxStartups/MaxSessions
    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(lambda i: ssh(ssh_hosts[i % 3], f"echo {i}"), range(30)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(30)]


def test_stop_refuses_and_restart_keeps_host_key(
    ssh_hosts: list[SSHTestHost], sshd_fleet: SSHDFleet
) -> None:
    h = ssh_hosts[2]
    pid = sshd_fleet.pid(h)
    assert pid is not None
    sshd_fleet.stop(h)
    assert sshd_fleet.pid(h) is None
    assert not port_accepts(h.address, h.port)
    assert not os.path.exists(f"/proc/{pid}")
    r = ssh(h, "echo ok")
    assert r.returncode == 255
    assert "Connection refused" in r.stderr

    again = sshd_fleet.restart(h)
    assert (again.address, again.port) == (h.address, h.port)
    assert again.host_key_fingerprint == h.host_key_fingerprint
    assert sshd_fleet.pid(h) not in (None, pid)
    # the old known_hosts still verifies it: same host key
    r = ssh(h, "echo ok")
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    assert host_key_fingerprint_seen(h) == h.host_key_fingerprint


def test_stop_drops_open_connections(ssh_hosts: list[SSHTestHost], sshd_fleet: SSHDFleet) -> None:
    h = ssh_hosts[0]
    session = subprocess.Popen(
        # `read` ends with the connection (EOF on stdin), so nothing outlives the test
        h.ssh_argv("echo started; read line"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert session.stdout is not None
        assert session.stdout.readline() == b"started\n"
        t = time.monotonic()
        sshd_fleet.stop(h)
        assert session.wait(10) != 0
        assert time.monotonic() - t < 5
    finally:
        session.kill()
        session.wait()
    sshd_fleet.restart(h)


def test_stop_can_keep_open_connections(
    ssh_hosts: list[SSHTestHost], sshd_fleet: SSHDFleet
) -> None:
    h = ssh_hosts[1]
    session = subprocess.Popen(
        h.ssh_argv("echo started; read line; echo got $line"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert session.stdout is not None
        assert session.stdout.readline() == b"started\n"
        sshd_fleet.stop(h, drop_connections=False)
        assert not port_accepts(h.address, h.port)
        out, _ = session.communicate(b"more\n", timeout=10)
        assert out == b"got more\n"
    finally:
        session.kill()
        session.wait()


def test_new_host_key_is_refused_until_trusted(sshd_fleet: SSHDFleet, tmp_path) -> None:
    # a host of its own: the shared ones keep their keys
    [h] = sshd_fleet.start(1)
    old = tmp_path / "known_hosts"
    old.write_text(h.known_hosts_line + "\n")
    rekeyed = sshd_fleet.restart(h, new_host_key=True)
    assert rekeyed.host_key_fingerprint != h.host_key_fingerprint
    assert host_key_fingerprint_seen(h) == rekeyed.host_key_fingerprint
    r = ssh(h, "echo ok", known_hosts=old)
    assert r.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in r.stderr
    # the fleet-wide known_hosts follows the new key
    assert rekeyed.known_hosts_line in sshd_fleet.known_hosts.read_text()
    assert ssh(rekeyed, "echo ok").stdout == "ok\n"
    sshd_fleet.stop(h)


def test_three_hosts_start_in_under_a_second(tmp_path) -> None:
    fleet = SSHDFleet()
    try:
        t = time.monotonic()
        hosts = fleet.start(3)
        elapsed = time.monotonic() - t
        pids = [fleet.pid(h) for h in hosts]
        assert elapsed < 1.0, f"3 hosts took {elapsed:.2f} s"
        assert all(port_accepts(h.address, h.port) for h in hosts)
    finally:
        fleet.cleanup()
    # torn down by pid: processes gone, ports closed, files removed
    assert not [p for p in pids if p is not None and os.path.exists(f"/proc/{p}")]
    assert not [h for h in hosts if port_accepts(h.address, h.port)]
    assert not fleet.base.exists()


def test_inventory_snippet_loads(ssh_hosts: list[SSHTestHost], sshd_fleet: SSHDFleet) -> None:
    app = f'[app]\nname = "t"\ndeploy_to = "{deploy_to_template(ssh_hosts)}"\n'
    text = sshd_fleet.inventory_toml(app, hosts=ssh_hosts)
    inv = inventory.parse(tomllib.loads(text))
    assert list(inv.hosts) == ["host1", "host2", "host3"]
    for h in ssh_hosts:
        got = inv.hosts[h.name]
        assert (got.address, got.port, got.user) == (h.address, h.port, h.user)
        assert got.ssh.identity == str(h.identity)
        assert got.ssh.known_hosts == str(h.known_hosts)
        assert got.app.deploy_to == str(h.root)
        assert not got.ssh.trust_new_hosts


@pytest.mark.skipif(os.geteuid() != 0, reason="the dedicated user is only used as root")
def test_dedicated_user_cannot_be_root(ssh_hosts: list[SSHTestHost]) -> None:
    h = ssh_hosts[0]
    argv = h.ssh_argv("echo ok")
    argv[argv.index(f"{h.user}@{h.address}")] = f"root@{h.address}"
    r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    assert r.returncode == 255
