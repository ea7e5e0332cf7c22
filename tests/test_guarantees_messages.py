"""Errors that claim to be clear must say what failed: the exception type the
callers catch, and a message naming the host and the path. (The version in
test_transport.py accepts any OSError.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from sshd import SSHTestHost
from test_transport import host_config

from deployer.errors import DeployerError, TransportError
from deployer.ssh import SSHHost
from deployer.transport import LocalHost


def test_ssh_put_into_missing_directory_names_host_and_path(
    ssh_hosts: list[SSHTestHost],
) -> None:
    h = ssh_hosts[0]
    target = f"{h.root}/no/such/dir/file"
    host = SSHHost(host_config(h))
    try:
        with pytest.raises(TransportError) as e:
            host.put(b"x", target)
    finally:
        host.close()
    assert isinstance(e.value, DeployerError)  # what FleetSession.each reports per host
    assert str(e.value).startswith(f"{h.name}: could not put {target}: "), str(e.value)
    assert "no such file" in str(e.value).lower()


def test_local_put_into_missing_directory_names_the_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(TransportError) as e:
        LocalHost("local").put(b"x", str(missing / "file"))
    assert str(e.value).startswith(f"local: could not put {missing / 'file'}: ")
    assert str(missing) in str(e.value) and "No such file" in str(e.value)
    assert not (tmp_path / "no").exists()
