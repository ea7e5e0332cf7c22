"""The inventory's sections as frozen dataclasses: each field carries its checker,
so the key list, defaults, types and error messages cannot drift apart; the
hosts with every layer merged; the inventory itself."""

from __future__ import annotations

import dataclasses
import getpass
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from deployer.errors import HostSelectionError
from deployer.hostapi import checks
from deployer.hostapi.checks import (
    boolean,
    choice,
    integer,
    string,
)
from deployer.hostapi.layout import Layout
from deployer.hostapi.options import MasterConfig
from deployer.inventory.checks import (
    MAX_HOSTS,
    MAX_KEEP_RELEASES,
    MAX_PARALLEL,
    MAX_PASSES,
    app_name,
    batch,
    database,
    host_address,
    key,
    max_failed,
    number,
    shared_paths,
    url,
)
from deployer.inventory.selection import select_hosts, select_roles


@dataclass(frozen=True)
class AppConfig:
    name: str = key(app_name)
    deploy_to: str = key(string, expand=True)
    keep_releases: int = key(integer(minimum=2, maximum=MAX_KEEP_RELEASES), 5)
    shared: tuple[str, ...] = key(shared_paths, ())
    build: str | None = key(string, None, expand=True)
    repo: str | None = key(string, None)


@dataclass(frozen=True)
class HealthConfig:
    url: str = key(url, expand=True)
    expect_status: int = key(integer(minimum=100, maximum=599), 200)
    timeout: float = key(number(), 30.0)
    passes: int = key(integer(minimum=1, maximum=MAX_PASSES), 3)
    interval: float = key(number(), 0.2)


@dataclass(frozen=True)
class MigrationsConfig:
    dir: str = key(string, "migrations")
    database: str = key(database, "sqlite:///db/deployer.sqlite3")
    host: str | None = key(string, None)
    contract: str = key(choice("after-rollout", "next-rollout"), "after-rollout")


@dataclass(frozen=True)
class RolloutConfig:
    # after the canary, the rest at once: each host's master still replaces its
    # workers new-before-old, so no host loses capacity (a ramp like [2, "50%"] or
    # batch = 1 exposes fewer hosts at a time)
    batch: tuple[int | str, ...] = key(batch, ("100%",))
    canary: int = key(integer(minimum=0, maximum=MAX_HOSTS), 1)
    max_failed: int | str = key(max_failed, 0)
    on_failure: str = key(choice("rollback", "halt"), "rollback")
    parallel: int = key(integer(minimum=1, maximum=MAX_PARALLEL), 10)
    # seconds from its switch the canary batch is watched before any other host
    # switches: a worker crash, a worker not ready or a failing health probe in that
    # time fails it. Later batches are looked at again (every crash since their own
    # switch) as the next ones switch and at the end, not waited for one by one.
    watch: float = key(checks.seconds(0.0, inclusive=True), 5.0)


@dataclass(frozen=True)
class SSHConfig:
    user: str | None = key(string, None)
    # None: whatever ~/.ssh/config says for the address, else 22
    port: int | None = key(integer(minimum=1, maximum=65535), None)
    identity: str | None = key(string, None)
    known_hosts: str = key(string, "~/.ssh/known_hosts")
    trust_new_hosts: bool = key(boolean, False)
    python: str = key(string, "python3")
    config_file: str | None = key(string, None)  # an ssh_config file instead of ~/.ssh/config
    connect_timeout: float = key(number(), 10.0)
    retry_deadline: float = key(number(), 20.0)
    # seconds the keeper (deployer/keeper.py) keeps connections and agent sessions
    # open after the last command that used them; 0: every command connects itself
    persist: float = key(checks.seconds(0.0, inclusive=True, maximum=86400.0), 0.0)


@dataclass(frozen=True)
class RoleConfig:
    """One process type on one host: its master, health check and environment, with
    the layers merged (host's role table > host > role > top level)."""

    name: str | None  # None: the single implicit role of an inventory without [roles]
    master: MasterConfig | None
    health: HealthConfig | None
    env: dict[str, str] = field(default_factory=dict)
    # "master.workers" -> the table that set it ("[hosts.big.master]"); unset: default
    origins: dict[str, str] = field(default_factory=dict)


def master_label(role: str | None) -> str:
    """How messages name a role's master: "web master", or "master" without roles."""
    return "master" if role is None else f"{role} master"


@dataclass(frozen=True)
class HostConfig:
    """One target host, with [ssh] merged in and {host}/{address} expanded."""

    name: str
    address: str
    transport: str
    ssh: SSHConfig
    app: AppConfig
    roles: tuple[RoleConfig, ...] = ()

    @property
    def port(self) -> int:
        return self.ssh.port or 22

    @property
    def layout(self) -> Layout:
        """The host's paths under deploy_to (the host agent uses the same class)."""
        return Layout.at(self.app.deploy_to)

    @property
    def role_names(self) -> list[str]:
        return [r.name for r in self.roles if r.name is not None]

    def role(self, name: str | None) -> RoleConfig:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)

    def _implicit(self) -> RoleConfig | None:
        return self.roles[0] if len(self.roles) == 1 and self.roles[0].name is None else None

    # The implicit role's sections (an inventory without [roles]); None with roles.
    @property
    def master(self) -> MasterConfig | None:
        r = self._implicit()
        return None if r is None else r.master

    @property
    def health(self) -> HealthConfig | None:
        r = self._implicit()
        return None if r is None else r.health

    @property
    def env(self) -> dict[str, str]:
        r = self._implicit()
        return {} if r is None else r.env

    @property
    def masters(self) -> list[RoleConfig]:
        """The roles that run a master here."""
        return [r for r in self.roles if r.master is not None]

    def master_config(self, role: str | None = None) -> MasterConfig | None:
        """What master.toml (master-<role>.toml) says on this host: the role's
        master, with the layout's paths."""
        try:
            r = self.role(role)
        except KeyError:
            return None
        if r.master is None:
            return None
        layout = self.layout.for_role(role)
        return dataclasses.replace(
            r.master,
            cwd=str(layout.current),
            socket=str(layout.socket),
            pidfile=str(layout.pidfile),
            log=str(layout.master_log),
            env=dict(r.env),
            env_file=str(layout.secrets),
        )

    def only_roles(self, names: Iterable[str]) -> HostConfig:
        """This host with just the roles named (`--roles`)."""
        wanted = set(names)
        return dataclasses.replace(self, roles=tuple(r for r in self.roles if r.name in wanted))

    @property
    def user(self) -> str | None:
        return self.ssh.user

    def describe(self) -> dict[str, Any]:
        local = self.transport == "local"
        return {
            "name": self.name,
            "address": self.address,
            "port": None if local else self.port,
            # a local host runs as whoever runs deployer; an ssh host without a
            # user gets it from ~/.ssh/config or the local user, decided at connect time
            "user": getpass.getuser() if local else self.user,
            "transport": self.transport,
            "deploy_to": self.app.deploy_to,
            "roles": self.role_names,
        }


# Keys a [hosts.NAME] table may set besides every [ssh] key.
HOST_KEYS = {"address": host_address, "transport": choice("ssh", "local")}
# Sections a [hosts.NAME] table may override key by key.
OVERRIDES: dict[str, type] = {"master": MasterConfig, "health": HealthConfig}
# What a [roles.NAME] table (and a host's [hosts.NAME.roles.ROLE]) may hold.
ROLE_KEYS = (*OVERRIDES, "env")
SECTIONS: dict[str, type] = {
    "app": AppConfig,
    "master": MasterConfig,
    "health": HealthConfig,
    "migrations": MigrationsConfig,
    "rollout": RolloutConfig,
    "ssh": SSHConfig,
}


@dataclass(frozen=True)
class Inventory:
    path: str
    app: AppConfig
    master: MasterConfig | None
    health: HealthConfig | None
    migrations: MigrationsConfig | None
    rollout: RolloutConfig
    ssh: SSHConfig
    hosts: dict[str, HostConfig]
    destination: str | None = None  # -d NAME: <stem>.NAME.toml was merged over `path`
    roles: tuple[str, ...] = ()  # the [roles.NAME] tables; () : the single implicit role

    def select(self, patterns: str | None, roles: str | None = None) -> list[HostConfig]:
        """Hosts by `--hosts` globs, then by `--roles`: the hosts that have one of the
        roles, each with just those roles (their masters are the ones acted on)."""
        hosts = select_hosts(self.hosts, patterns)
        if roles is None or not roles.strip():
            return hosts
        wanted = select_roles(self.roles, roles)
        chosen = [h.only_roles(wanted) for h in hosts if set(h.role_names) & set(wanted)]
        if not chosen:
            raise HostSelectionError(
                f"--roles: no selected host has the role(s) {', '.join(wanted)}"
            )
        return chosen
