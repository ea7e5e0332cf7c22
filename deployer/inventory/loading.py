"""inventory.toml (and a stage's overlay) read, checked and merged into an
`Inventory`; every problem collected before reporting, so an operator fixes a
file in one pass."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from deployer.errors import BadInput, InventoryError
from deployer.hostapi import checks, options, workerenv
from deployer.hostapi.checks import (
    Checker,
    Invalid,
)
from deployer.hostapi.checks import describe as _describe
from deployer.hostapi.layout import ROLE_NAME
from deployer.hostapi.options import MasterConfig
from deployer.inventory.checks import REQUIRED, url_host
from deployer.inventory.sections import (
    HOST_KEYS,
    OVERRIDES,
    ROLE_KEYS,
    SECTIONS,
    HostConfig,
    Inventory,
    RoleConfig,
    SSHConfig,
)
from deployer.inventory.selection import suggest

DEFAULT_PATH = "inventory.toml"
ENV_VAR = "DEPLOYER_INVENTORY"


class _Problems:
    """Collects problems with their location, so all of them are reported at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        item = f"{where}: {message}"
        if item not in self.items:  # a role's problem, met again on each of its hosts
            self.items.append(item)


def _unknown_keys(table: dict, known: Iterable[str], where: str, problems: _Problems) -> None:
    known = list(known)
    for name in table:
        if name not in known:
            problems.add(
                f"{where} {name}",
                f"unknown key{suggest(name, known)}; known keys: {', '.join(known)}",
            )


class _Key(NamedTuple):
    name: str
    check: Checker
    required: bool
    expand: bool


def section_keys(cls: type) -> list[_Key]:
    """A section's keys: [master]'s from the master options table, the others'
    from their dataclass fields."""
    if cls is MasterConfig:
        return [_Key(o.key, o.check, o.required, o.expand) for o in options.INVENTORY_OPTIONS]
    return [
        _Key(f.name, f.metadata["check"], f.default is REQUIRED, f.metadata["expand"])
        for f in dataclasses.fields(cls)
    ]


def _check_fields(
    cls: type, table: dict, where: str, problems: _Problems, partial: bool = False
) -> dict[str, Any]:
    """Check each key of `table` against the keys of `cls`; returns the good values.
    `partial`: an override of some keys (a host's), required ones may be elsewhere."""
    values: dict[str, Any] = {}
    keys = section_keys(cls)
    _unknown_keys(table, [k.name for k in keys], where, problems)
    for k in keys:
        if k.name not in table:
            if k.required and not partial:
                problems.add(f"{where} {k.name}", "required key is missing")
            continue
        try:
            values[k.name] = k.check(table[k.name])
        except Invalid as e:
            problems.add(f"{where} {k.name}", str(e))
    return values


def _build(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate a section, or None if a required key was bad (already reported)."""
    try:
        return cls(**values)
    except TypeError:
        return None


_PLACEHOLDER = re.compile(r"\{(host|address)\}")


def _placeholders(text: str, host_name: str, address: str) -> str:
    subst = {"host": host_name, "address": address}
    return _PLACEHOLDER.sub(lambda m: subst[m.group(1)], text)


def _expand(section: Any, host_name: str, address: str) -> Any:
    """Per-host copy of a section with {host} and {address} substituted."""
    if section is None:
        return None

    def one(v: Any) -> Any:
        if isinstance(v, str):
            return _placeholders(v, host_name, address)
        if isinstance(v, tuple):
            return tuple(one(x) for x in v)
        return v

    changes = {
        k.name: one(getattr(section, k.name)) for k in section_keys(type(section)) if k.expand
    }
    return dataclasses.replace(section, **changes)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InventoryError(
            path,
            [
                "file not found (give one with --inventory/-i or $DEPLOYER_INVENTORY; "
                "inventory.example.toml documents every key)"
            ],
        ) from None
    except IsADirectoryError:
        raise InventoryError(path, ["is a directory, expected a TOML file"]) from None
    except PermissionError:
        raise InventoryError(path, ["permission denied"]) from None
    except tomllib.TOMLDecodeError as e:
        raise InventoryError(path, [f"not valid TOML: {e}"]) from None
    except UnicodeDecodeError as e:
        raise InventoryError(path, [f"not valid UTF-8: {e}"]) from None
    except RecursionError:
        # tomllib recurses once per nesting level: `a = [[[[...` exhausts the stack
        raise InventoryError(path, ["not valid TOML: arrays or tables nested too deeply"]) from None


def _section(data: dict, name: str, problems: _Problems) -> dict | None:
    table = data.get(name)
    if table is None:
        return None
    if not isinstance(table, dict):
        problems.add(f"[{name}]", f"expected a table, got {_describe(table)}")
        return None
    return table


def load(path: str | os.PathLike[str] | None = None, destination: str | None = None) -> Inventory:
    """Read and validate an inventory; raises InventoryError listing every problem.

    With a destination (`-d staging`), `<stem>.<destination>.toml` beside it
    (`inventory.staging.toml`) is deep-merged over it first, and the merged document is
    validated as one inventory."""
    path = str(path or os.environ.get(ENV_VAR) or DEFAULT_PATH)
    if not destination:
        return parse(_read_toml(path), path)
    overlay = overlay_path(path, destination)
    base = _read_toml(path)
    if not overlay.exists() and not overlay.is_symlink():
        raise InventoryError(
            str(overlay), [f"file not found: -d {destination} merges it over {path}"]
        )
    layer = _read_toml(str(overlay))
    try:
        return dataclasses.replace(parse(merge(base, layer), path), destination=destination)
    except InventoryError as e:
        raise _blame(e, base, path, overlay) from None


DESTINATION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_destination(name: str) -> str:
    """A destination's name: it names a file beside the inventory and a state directory."""
    if not DESTINATION.fullmatch(name):
        raise BadInput(
            f"-d/--destination: expected a name of letters, digits, '_' and '-' (at most 64, "
            f"not starting with '-' or '_'), got {name!r}"
        )
    return name


def overlay_path(path: str | os.PathLike[str], destination: str) -> Path:
    """`inventory.toml` + staging -> `inventory.staging.toml`, in the same directory."""
    base = Path(path)
    return base.with_name(f"{base.stem}.{check_destination(destination)}{base.suffix}")


def merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """`layer` over `base`: tables merge key by key, arrays and scalars replace."""
    out = dict(base)
    for k, v in layer.items():
        old = out.get(k)
        out[k] = merge(old, v) if isinstance(old, dict) and isinstance(v, dict) else v
    return out


def _blame(e: InventoryError, base: dict[str, Any], path: str, overlay: Path) -> InventoryError:
    """The merged document's problems, each one the base alone does not have named with
    the overlay file (its key, or its value meeting the base's, made it)."""
    try:
        parse(base, path)
        own: set[str] = set()
    except InventoryError as alone:
        own = set(alone.problems)
    blamed = [p if p in own else f"{overlay}: {p}" for p in e.problems]
    return InventoryError(f"{path} with {overlay.name}", blamed)


def parse(data: dict[str, Any], path: str = "<inventory>") -> Inventory:
    problems = _Problems()
    sections: dict[str, Any] = {}
    good: dict[str, dict[str, Any]] = {}  # each section's good values, for host overrides
    _unknown_keys(data, [*SECTIONS, "env", "hosts", "roles"], "top level", problems)
    sections["env"] = _env(data.get("env"), "[env]", problems)
    roles = _parse_roles(data, problems)

    for name, cls in SECTIONS.items():
        table = _section(data, name, problems)
        if table is None:
            # [app] is required; [ssh] and [rollout] have defaults for everything;
            # the others are optional features (no master, no health gate, no migrations).
            if name == "app" and "app" not in data:
                problems.add("[app]", "required section is missing (name and deploy_to)")
            sections[name] = cls() if name in ("ssh", "rollout") else None
            continue
        # With roles, [master] and [health] hold what the roles share: a role completes them.
        partial = roles is not None and name in OVERRIDES
        good[name] = _check_fields(cls, table, f"[{name}]", problems, partial=partial)
        sections[name] = _build(cls, good[name])

    ssh: SSHConfig = sections["ssh"] or SSHConfig()
    hosts = _parse_hosts(data, sections, good, roles, ssh, problems)
    _check_conflicts(hosts, problems)
    _check_health_urls(hosts, problems)
    if sections["migrations"] is not None:
        mhost = sections["migrations"].host
        if mhost is not None and mhost not in hosts and hosts:
            problems.add(
                "[migrations] host",
                f"no host named {mhost!r}{suggest(mhost, hosts)}; hosts: {', '.join(hosts)}",
            )

    if problems.items:
        raise InventoryError(path, problems.items)
    return Inventory(
        path=path,
        app=sections["app"],
        master=sections["master"],
        health=sections["health"],
        migrations=sections["migrations"],
        rollout=sections["rollout"],
        ssh=ssh,
        hosts=hosts,
        roles=tuple(roles or ()),
    )


class _Layer(NamedTuple):
    """One table of a role's master, health or env: where it is and its good values."""

    where: str  # "[roles.web.master]"
    values: dict[str, Any]
    keys: frozenset[str]  # every key the table sets, good or bad (bad ones are reported)


def _layer(table: Any, cls: type | None, where: str, problems: _Problems) -> _Layer | None:
    """A [..master]/[..health] (cls) or [..env] (None) table, checked; None if absent."""
    if table is None:
        return None
    if not isinstance(table, dict):
        problems.add(where, f"expected a table, got {_describe(table)}")
        return None
    values = (
        _env(table, where, problems)
        if cls is None
        else (_check_fields(cls, table, where, problems, partial=True))
    )
    return _Layer(where, values, frozenset(table))


def _parse_roles(data: dict, problems: _Problems) -> dict[str, dict[str, _Layer]] | None:
    """[roles.NAME.master|health|env]: each role's own tables; None without [roles]."""
    table = _section(data, "roles", problems)
    if table is None:
        return None
    roles: dict[str, dict[str, _Layer]] = {}
    if not table:
        problems.add("[roles]", "empty: define [roles.NAME] tables, or drop [roles]")
    for name, spec in table.items():
        where = f"[roles.{name}]"
        if not ROLE_NAME.fullmatch(name):
            problems.add(
                where,
                "role names are lowercase letters, digits, '_' and '-', "
                "starting with a letter (at most 32)",
            )
            continue
        if not isinstance(spec, dict):
            problems.add(where, f"expected a table, got {_describe(spec)}")
            continue
        roles[name] = _role_layers(spec, f"roles.{name}", problems)
    return roles


def _role_layers(spec: dict, prefix: str, problems: _Problems) -> dict[str, _Layer]:
    _unknown_keys(spec, ROLE_KEYS, f"[{prefix}]", problems)
    layers = {}
    for section in ROLE_KEYS:
        layer = _layer(spec.get(section), OVERRIDES.get(section), f"[{prefix}.{section}]", problems)
        if layer is not None:
            layers[section] = layer
    return layers


def _host_roles(
    spec: dict, where: str, defined: dict[str, dict[str, _Layer]] | None, problems: _Problems
) -> dict[str, dict[str, _Layer]] | None:
    """A host's roles: `roles = ["web", "worker"]`, or a table of them whose entries may
    override the role's tables (`[hosts.big.roles.web.master]`); None: no [roles]."""
    value = spec.get("roles")
    if defined is None:
        if value is not None:
            problems.add(f"{where} roles", "there is no [roles] table: define [roles.NAME] first")
        return None
    known = ", ".join(defined) or "(none)"
    if value is None:
        problems.add(f"{where} roles", f"required when [roles] is defined; roles: {known}")
        return {}
    if isinstance(value, list):
        names = {}
        for v in value:
            if not isinstance(v, str):
                problems.add(f"{where} roles", f"expected role names, got {_describe(v)}")
                continue
            names[v] = {}
    elif isinstance(value, dict):
        names = {
            n: _role_layers(t, f"{where[1:-1]}.roles.{n}", problems) if isinstance(t, dict) else {}
            for n, t in value.items()
        }
        for n, t in value.items():
            if not isinstance(t, dict):
                problems.add(f"{where[:-1]}.roles.{n}]", f"expected a table, got {_describe(t)}")
    else:
        problems.add(
            f"{where} roles", f"expected a list of role names or a table, got {_describe(value)}"
        )
        return {}
    if not names:
        problems.add(f"{where} roles", f"names no role; roles: {known}")
    for n in names:
        if n not in defined:
            problems.add(
                f"{where} roles", f"no role named {n!r}{suggest(n, defined)}; roles: {known}"
            )
    return {n: layers for n, layers in names.items() if n in defined}


def _layered(
    section: str,
    layers: list[_Layer | None],
    top_reported: bool,
    problems: _Problems,
) -> tuple[Any, dict[str, str]]:
    """A role's [master] or [health] on a host: its tables merged, lowest first; None
    if none of them exists. The values' origins, for `deployer config`."""
    present = [layer for layer in layers if layer is not None]
    if not present:
        return None, {}
    cls = OVERRIDES[section]
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    keys: set[str] = set()
    for layer in present:
        merged.update(layer.values)
        keys |= layer.keys
        origins.update({f"{section}.{k}": layer.where for k in layer.values})
    missing = [k.name for k in section_keys(cls) if k.required and k.name not in keys]
    top = present[-1] is layers[0]
    if missing and not (top and top_reported):
        for key in missing:
            problems.add(
                f"{present[-1].where} {key}",
                "required key is missing (here or in the tables it overrides)",
            )
    # a bad value was left out of `merged` and reported: the inventory is refused anyway
    return (None if missing else _build(cls, merged)), origins


_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _parse_hosts(
    data: dict,
    sections: dict[str, Any],
    values: dict[str, dict[str, Any]],
    roles: dict[str, dict[str, _Layer]] | None,
    ssh: SSHConfig,
    problems: _Problems,
) -> dict[str, HostConfig]:
    table = _section(data, "hosts", problems)
    if not table:
        if table is not None or "hosts" not in data:
            problems.add("[hosts]", "no hosts defined (add at least one [hosts.NAME] table)")
        return {}
    ssh_fields = {f.name: f for f in dataclasses.fields(SSHConfig)}
    hosts: dict[str, HostConfig] = {}
    endpoints: dict[tuple[str, int], str] = {}
    for name, spec in table.items():
        where = f"[hosts.{name}]"
        if not _HOST_NAME.fullmatch(name):
            problems.add(where, "host names are letters, digits, '.', '_' and '-'")
            continue
        if not isinstance(spec, dict):
            problems.add(where, f"expected a table, got {_describe(spec)}")
            continue
        _unknown_keys(spec, [*HOST_KEYS, *ssh_fields, *ROLE_KEYS, "roles"], where, problems)
        host_roles = _host_roles(spec, where, roles, problems)
        own = {k: v for k, v in spec.items() if k in HOST_KEYS}
        overrides = {k: v for k, v in spec.items() if k in ssh_fields}
        good = {}
        for k, v in own.items():
            try:
                good[k] = HOST_KEYS[k](v)
            except Invalid as e:
                problems.add(f"{where} {k}", str(e))
        transport = good.get("transport", "ssh")
        if "address" not in good:
            if transport == "local":
                good["address"] = "127.0.0.1"
            elif "address" not in own:
                problems.add(f"{where} address", "required key is missing for an ssh host")
                continue
            else:
                continue
        checked = {}
        for k, v in overrides.items():
            try:
                checked[k] = ssh_fields[k].metadata["check"](v)
            except Invalid as e:
                problems.add(f"{where} {k}", str(e))
        host_ssh = dataclasses.replace(ssh, **checked)
        if transport == "ssh":
            endpoint = (good["address"], host_ssh.port or 22)
            other = endpoints.setdefault(endpoint, name)
            if other != name:
                problems.add(
                    where,
                    f"ssh endpoint {endpoint[0]}:{endpoint[1]} is also used by "
                    f"[hosts.{other}] (duplicate address:port)",
                )
        if sections.get("app") is None:
            continue  # already reported; nothing to expand
        address = good["address"]
        own_layers = _role_layers(
            {k: spec[k] for k in ROLE_KEYS if k in spec}, where[1:-1], problems
        )
        top = {
            section: _Layer(f"[{section}]", values[section], frozenset(data[section]))
            for section in OVERRIDES
            if section in values
        }
        top["env"] = _Layer("[env]", sections["env"], frozenset(sections["env"]))
        if host_roles is None:
            plan: dict[str | None, list[dict[str, _Layer]]] = {None: [top, own_layers]}
        else:
            assert roles is not None
            plan = {r: [top, roles[r], own_layers, extra] for r, extra in host_roles.items()}
        hosts[name] = HostConfig(
            name=name,
            address=address,
            transport=transport,
            ssh=host_ssh,
            app=_expand(sections["app"], name, address),
            roles=tuple(
                _role(role, tables, name, address, host_roles is None, problems)
                for role, tables in plan.items()
            ),
        )
    return hosts


def _role(
    name: str | None,
    tables: list[dict[str, _Layer]],
    host: str,
    address: str,
    implicit: bool,
    problems: _Problems,
) -> RoleConfig:
    """One role on one host from its tables, lowest first: top level, [roles.NAME],
    [hosts.HOST], [hosts.HOST.roles.NAME]."""
    origins: dict[str, str] = {}
    built: dict[str, Any] = {}
    for section in OVERRIDES:
        # the implicit role's top-level tables were checked whole (required keys included)
        value, where = _layered(section, [t.get(section) for t in tables], implicit, problems)
        built[section] = _expand(value, host, address)
        origins.update(where)
    env: dict[str, str] = {}
    for t in tables:
        layer = t.get("env")
        if layer is not None:
            env.update(layer.values)
            origins.update({f"env.{k}": layer.where for k in layer.values})
    return RoleConfig(
        name=name,
        master=built["master"],
        health=built["health"],
        env={k: _placeholders(v, host, address) for k, v in env.items()},
        origins=origins,
    )


def _env(table: Any, where: str, problems: _Problems) -> dict[str, str]:
    """[env] (or a host's env): NAME = "value" for the workers; values expand
    {host}/{address}. Secrets never here: `deployer secrets set`."""
    if table is None:
        return {}
    try:
        env = checks.env(table)
    except Invalid as e:
        problems.add(where, str(e))
        return {}
    for name in env:
        why = workerenv.reserved(name)
        if why:
            problems.add(f"{where} {name}", f"{why}; pick another name")
    return env


def _same_machine_key(h: HostConfig) -> str:
    return "local" if h.transport == "local" else h.address


def _check_conflicts(hosts: dict[str, HostConfig], problems: _Problems) -> None:
    """Two hosts on one machine (or two roles of a host) that would take the same port
    or directory."""
    seen: dict[tuple, tuple[str, str]] = {}

    def claim(kind: str, ident: tuple, name: str, who: str, what: str) -> None:
        other, other_who = seen.setdefault((kind, *ident), (name, who))
        if (other, other_who) == (name, who):
            return
        where = f"[hosts.{other}]" + (f" ({other_who})" if other_who else "")
        here = "on this host" if other == name else "on the same machine"
        problems.add(f"[hosts.{name}]", f"{what} is also used by {where} {here}")

    for name, h in hosts.items():
        machine = _same_machine_key(h)
        for r in h.masters:
            listen = r.master.listen if r.master else None
            if listen is not None:
                what = "[master]" if r.name is None else f"role {r.name}'s"
                claim("listen", (machine, listen), name, r.name or "", f"{what} listen {listen}")
        deploy_to = h.app.deploy_to
        claim("deploy_to", (machine, deploy_to), name, "", f"[app] deploy_to {deploy_to}")


def _canonical(text: str) -> str:
    """A host part as compared: an IP in its one written form, a name in lowercase
    without the root's trailing dot."""
    text = text.lower().strip("[]").rstrip(".")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_health_urls(hosts: dict[str, HostConfig], problems: _Problems) -> None:
    """The probe runs on the host itself: a URL naming another machine would report
    that machine's health as this host's, and pass a broken release."""
    owners: dict[str, str] = {}  # every host's address and name -> the host
    for name, h in hosts.items():
        owners.setdefault(_canonical(h.address), name)
    for name in hosts:
        owners.setdefault(_canonical(name), name)
    for name, h in hosts.items():
        for r in h.roles:
            if r.health is not None:
                _check_health_url(name, h, r.health.url, owners, problems)


def _check_health_url(
    name: str, h: HostConfig, url: str, owners: dict[str, str], problems: _Problems
) -> None:
    target = url_host(url)
    if target is None or _names_this_host(_canonical(target), h, owners):
        return
    other = owners.get(_canonical(target))
    whose = f" ([hosts.{other}])" if other not in (None, name) else ""
    problems.add(
        f"[hosts.{name}] [health] url",
        f"{url!r} names host {target!r}{whose}, not {name} (address {h.address}): the probe "
        f"runs on {name} itself, so it would report {target}'s health as {name}'s; use "
        "{address} (or localhost, 127.0.0.1)",
    )


def _names_this_host(target: str, h: HostConfig, owners: dict[str, str]) -> bool:
    if target == "localhost" or target == _canonical(h.address):
        return True
    if _is_ip(target):
        return ipaddress.ip_address(target).is_loopback  # 127.0.0.0/8, ::1
    # {host}: the host's name, unless that name is another host's address
    return target == _canonical(h.name) and owners.get(target) == h.name
