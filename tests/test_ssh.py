"""SSHHost against real sshd hosts: host keys, retries, reuse, ssh_config, ProxyJump."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sshd import SSHDFleet, SSHTestHost
from test_transport import host_config

from deployer.errors import TransportError
from deployer.hostpool import HostPool
from deployer.ssh import HostKeyRefused, SSHHost


def test_unknown_host_key_is_refused_with_fingerprint_and_the_line_to_trust_it(
    ssh_hosts: list[SSHTestHost], tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    target = SSHHost(host_config(ssh_hosts[0], known_hosts=str(known)))
    with pytest.raises(HostKeyRefused) as e:
        target.run(["true"])
    message = str(e.value)
    assert ssh_hosts[0].host_key_fingerprint in message
    assert "unknown host key" in message and not known.exists()
    # The message's one line, run as it says, makes the next connection work.
    trust_line = next(line for line in message.splitlines() if line.strip().startswith("echo "))
    subprocess.run(trust_line, shell=True, check=True)
    assert target.run(["echo", "ok"]).stdout == "ok\n"
    target.close()


def test_trust_new_hosts_accepts_and_records(ssh_hosts: list[SSHTestHost], tmp_path: Path) -> None:
    known = tmp_path / "sub" / "known_hosts"
    h = ssh_hosts[0]
    first = SSHHost(host_config(h, known_hosts=str(known), trust_new_hosts=True))
    assert first.run(["true"]).ok
    first.close()
    assert known.read_text() == f"{h.known_hosts_line}\n"
    # Recorded: a strict connection now verifies against it.
    again = SSHHost(host_config(h, known_hosts=str(known)))
    assert again.run(["true"]).ok
    again.close()


def test_changed_host_key_is_always_refused(
    sshd_fleet: SSHDFleet, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[2]
    old_fingerprint = h.host_key_fingerprint
    changed = sshd_fleet.restart(h, new_host_key=True)  # known_hosts still has the old key
    target = SSHHost(host_config(h, trust_new_hosts=True))
    with pytest.raises(HostKeyRefused) as e:
        target.run(["true"])
    message = str(e.value)
    assert "HOST KEY CHANGED" in message
    assert old_fingerprint in message and changed.host_key_fingerprint in message
    assert "ssh-keygen -R" in message


def test_connection_is_reused_and_reopened_after_a_drop(
    sshd_fleet: SSHDFleet, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[0]
    with HostPool() as pool:
        config = host_config(h)
        target = pool.get(config)
        assert pool.get(config) is target
        first = target.connection()
        target.run(["true"])
        assert target.connection() is first  # one connection for many commands
        sshd_fleet.stop(h)  # drops the open connection too
        sshd_fleet.restart(h)
        assert target.run(["echo", "back"]).stdout == "back\n"
        assert target.connection() is not first
    assert not first.is_connected


def test_retries_until_sshd_comes_back(sshd_fleet: SSHDFleet, ssh_hosts: list[SSHTestHost]) -> None:
    h = ssh_hosts[1]
    sshd_fleet.stop(h)
    restarter = threading.Timer(1.2, sshd_fleet.restart, args=(h,))
    restarter.start()
    target = SSHHost(host_config(h, retry_deadline=15.0))
    start = time.monotonic()
    try:
        assert target.run(["echo", "up"]).stdout == "up\n"
    finally:
        restarter.join()
        target.close()
    assert 1.0 < time.monotonic() - start < 6.0


def test_host_that_never_comes_back_fails_clearly_within_the_deadline(
    sshd_fleet: SSHDFleet, ssh_hosts: list[SSHTestHost]
) -> None:
    h = ssh_hosts[1]
    sshd_fleet.stop(h)
    target = SSHHost(host_config(h, retry_deadline=2.0))
    start = time.monotonic()
    with pytest.raises(TransportError) as e:
        target.run(["true"])
    elapsed = time.monotonic() - start
    message = str(e.value)
    assert f"{h.name}: connection refused at {h.address}:{h.port} (no sshd listening?" in message
    assert "attempts over" in message
    assert 1.0 < elapsed < 4.0
    attempts = int(message.split("listening? ")[1].split()[0])
    assert 3 <= attempts <= 6  # 0.25 + 0.5 + 1 s of backoff fit in 2 s, not more


def test_failed_command_is_not_retried(ssh_hosts: list[SSHTestHost]) -> None:
    h = ssh_hosts[0]
    target = SSHHost(host_config(h))
    marker = h.root / "count"
    script = f"echo x >> {marker}; exit 7"
    assert target.run(["sh", "-c", script]).exit_code == 7
    assert marker.read_text() == "x\n"
    target.close()


def test_authentication_failure_is_not_retried(
    ssh_hosts: list[SSHTestHost], tmp_path: Path
) -> None:
    other_key = tmp_path / "other"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True
    )
    target = SSHHost(host_config(ssh_hosts[0], identity=str(other_key)))
    start = time.monotonic()
    with pytest.raises(TransportError, match="authentication failed"):
        target.run(["true"])
    assert time.monotonic() - start < 3.0


def test_ssh_config_alias_and_proxyjump(ssh_hosts: list[SSHTestHost], tmp_path: Path) -> None:
    jump, inner = ssh_hosts[0], ssh_hosts[1]
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host jumpbox\n  HostName {jump.address}\n  Port {jump.port}\n  User {jump.user}\n"
        f"Host app-alias\n  HostName {inner.address}\n  Port {inner.port}\n"
        f"  User {inner.user}\n  ProxyJump jumpbox\n"
        f"Host *\n  IdentityFile {inner.identity}\n"
    )
    base = host_config(inner, config_file=str(config), port=None, user=None, identity=None)
    aliased = SSHHost(dataclasses.replace(base, address="app-alias"))
    result = aliased.run(["sh", "-c", "echo $SSH_CONNECTION"], check=True)
    # The inner host sees the connection coming from the jump host's sshd, not from us directly
    assert result.stdout.split()[2:4] == [inner.address, str(inner.port)]
    gateway = aliased.connection().gateway
    assert gateway is not None and gateway.is_connected
    aliased.close()


def test_proxyjump_hop_host_key_is_verified_too(
    ssh_hosts: list[SSHTestHost], tmp_path: Path
) -> None:
    jump, inner = ssh_hosts[0], ssh_hosts[1]
    known = tmp_path / "known_hosts"
    known.write_text(inner.known_hosts_line + "\n")  # the jump host's key is unknown
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host jumpbox\n  HostName {jump.address}\n  Port {jump.port}\n  User {jump.user}\n"
        f"  IdentityFile {jump.identity}\n"
        f"Host {inner.address}\n  ProxyJump jumpbox\n"
    )
    target = SSHHost(host_config(inner, config_file=str(config), known_hosts=str(known)))
    with pytest.raises(HostKeyRefused) as e:
        target.run(["true"])
    assert jump.host_key_fingerprint in str(e.value)


def test_connection_sends_and_acknowledges_small_packets_at_once(
    ssh_hosts: list[SSHTestHost], tmp_path: Path
) -> None:
    """Nagle's algorithm and delayed ACKs cost every connection ~90 ms (the auth
    request, then sshd's answer to the first channel open); the socket deployer
    opens turns both off, also for a host named through an ssh_config alias."""
    import socket

    from deployer.ssh import _PromptSocket

    h = ssh_hosts[0]
    config = tmp_path / "ssh_config"
    config.write_text(f"Host web-alias\n  HostName {h.address}\n  Port {h.port}\n")
    base = host_config(h, config_file=str(config), port=None)
    for target in (
        SSHHost(host_config(h)),
        SSHHost(dataclasses.replace(base, address="web-alias")),
    ):
        assert target.run(["echo", "ok"]).stdout == "ok\n"
        sock = target.connection().transport.sock
        assert isinstance(sock, _PromptSocket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getpeername()[:2] == (h.address, h.port)
        target.close()
