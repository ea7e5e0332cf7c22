"""The Transport of each inventory host (local or SSH), one per host in a process."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from deployer.ssh import SessionRelay, SSHHost
from deployer.transport import LocalHost, Transport

if TYPE_CHECKING:
    from deployer.inventory import HostConfig


class HostPool:
    """One Transport per inventory host within a process; closes them all at the end.
    `relay`: how SSH hosts with `[ssh] persist` open agent sessions (deployer.keeper)."""

    def __init__(self, relay: SessionRelay | None = None) -> None:
        self._hosts: dict[str, Transport] = {}
        self._lock = threading.Lock()
        self._relay = relay

    def get(self, config: HostConfig) -> Transport:
        with self._lock:
            host = self._hosts.get(config.name)
            if host is None:
                host = connect(config, self._relay)
                self._hosts[config.name] = host
            return host

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(config: HostConfig, relay: SessionRelay | None = None) -> Transport:
    """The Transport for an inventory entry (nothing is opened until the first command)."""
    if config.transport == "local":
        return LocalHost(config.name)
    return SSHHost(config, relay)
