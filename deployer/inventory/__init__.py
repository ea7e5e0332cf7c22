"""inventory.toml -> typed, validated config, and host selection by glob.

The schema lives on the dataclasses themselves (sections.py): each field carries a
checker in its metadata (checks.py), so the key list, defaults, types and error
messages cannot drift apart. Validation (loading.py) collects every problem before
reporting, so an operator fixes a file in one pass instead of one error per run.
"""

from deployer.inventory.loading import (
    check_destination,
    load,
    merge,
    overlay_path,
    parse,
    section_keys,
)
from deployer.inventory.sections import (
    SECTIONS,
    AppConfig,
    HealthConfig,
    HostConfig,
    Inventory,
    MigrationsConfig,
    RoleConfig,
    RolloutConfig,
    SSHConfig,
    master_label,
)
from deployer.inventory.selection import expand_path, select_hosts, select_roles

__all__ = [
    "SECTIONS",
    "AppConfig",
    "HealthConfig",
    "HostConfig",
    "Inventory",
    "MigrationsConfig",
    "RoleConfig",
    "RolloutConfig",
    "SSHConfig",
    "check_destination",
    "expand_path",
    "load",
    "master_label",
    "merge",
    "overlay_path",
    "parse",
    "section_keys",
    "select_hosts",
    "select_roles",
]
