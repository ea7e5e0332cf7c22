"""`deployer config`: the configuration each host gets, resolved, and its drift on
the hosts (`--diff`: master.toml, the env, the agent, through the agent-less probe,
hostapi/probe.py)."""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from deployer.bundle import build
from deployer.errors import DeployerError
from deployer.hostapi import answers, calls
from deployer.hostapi.checks import mask_url
from deployer.hostapi.options import LAYOUT_KEYS, MasterConfig, to_toml, toml_value
from deployer.inventory import HostConfig, Inventory, RoleConfig
from deployer.remote import RemoteHost
from deployer.session import FleetSession
from deployer.transport import Result


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def _master_values(cfg: MasterConfig) -> dict[str, Any]:
    """The options master.toml holds, as JSON values."""
    out: dict[str, Any] = {}
    for option, value in cfg.items():
        if option.key == "command":
            value = list(cfg.argv)
        elif option.key in ("ready", "stop_signal"):
            value = str(value) if option.key == "ready" else value.name
        out[option.key] = value
    return out


def _role_conf(host: HostConfig, role: RoleConfig) -> dict[str, Any]:
    master = host.master_config(role.name)
    return {
        "role": role.name,
        "master": None if master is None else _master_values(master),
        "master_toml": None
        if master is None
        else str(host.layout.for_role(role.name).master_config),
        "health": None if role.health is None else dataclasses.asdict(role.health),
        "env": dict(role.env),
        # "master.workers": "[hosts.big.master]": the table each value comes from
        "origins": dict(role.origins),
    }


def resolved(host: HostConfig, inv: Inventory) -> dict[str, Any]:
    """One host's configuration as deployer uses it: its tables merged (host's role
    table > host > role > top level), {host} and {address} expanded, each master as
    its master.toml has it, where each value comes from; passwords in URLs masked."""
    roles = [_role_conf(host, r) for r in host.roles]
    master = host.master_config()
    out = {
        "host": host.name,
        "address": host.address,
        "transport": host.transport,
        "ssh": None
        if host.transport == "local"
        else {"user": host.ssh.user, "port": host.port, "python": host.ssh.python},
        "app": dataclasses.asdict(host.app),
        "master": None if master is None else _master_values(master),
        "master_toml": None if master is None else str(host.layout.master_config),
        "health": None if host.health is None else dataclasses.asdict(host.health),
        "env": dict(host.env),
        "migrations": None if inv.migrations is None else dataclasses.asdict(inv.migrations),
        "roles": roles,
    }
    return _masked(out)


def render(conf: dict[str, Any]) -> list[str]:
    """A host's resolved configuration as TOML-like text (unset keys left out)."""
    where = conf["transport"] if conf["ssh"] is None else f"ssh {conf['ssh']['user'] or ''}"
    port = "" if conf["ssh"] is None else f" port {conf['ssh']['port']}"
    lines = [f"# {conf['host']}: {conf['address']} ({where.rstrip()}{port})"]
    _table(lines, "app", conf["app"])
    for role in conf["roles"]:
        prefix = "" if role["role"] is None else f"roles.{role['role']}."
        for section in ("master", "health", "env"):
            note = f"  # {role['master_toml']}" if section == "master" else ""
            _table(lines, prefix + section, role[section], note, role["origins"], section)
    _table(lines, "migrations", conf["migrations"])
    return lines


def _table(
    lines: list[str],
    name: str,
    table: dict[str, Any] | None,
    note: str = "",
    origins: dict[str, str] | None = None,
    section: str = "",
) -> None:
    """A [name] table; with `origins`, each key says which inventory table set it
    (`# default` if none did)."""
    if table is None:
        return
    lines.append(f"[{name}]{note}")
    for key, value in table.items():
        if value is None or (section == "master" and key == "env"):
            continue  # the env is its own table below
        shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)
        where = ""
        if origins is not None:
            source = origins.get(f"{section}.{key}")
            layout = section == "master" and key in LAYOUT_KEYS
            where = f"  # {source or ('layout' if layout else 'default')}"
        lines.append(f"{shown} = {toml_value(value)}{where}")


def run_probe(
    remote: RemoteHost, listen: str | None, timeout: float, role: str | None = None
) -> answers.Probe:
    """The probe, reading `role`'s master files (None: master.toml, run/master.pid)."""
    layout = remote.layout.for_role(role)
    argv = calls.probe(remote.config.ssh.python, layout, build().sha256, listen)
    result = remote.transport.run(argv, timeout=timeout)
    try:
        answer = answers.parse_result(result.stdout, answers.Probe)
    except (answers.AgentFailed, ValueError) as e:
        raise ProbeFailed(f"garbled answer: {e}") from None
    if answer is None:
        raise ProbeFailed(_probe_error(remote, result))
    return answer


class ProbeFailed(DeployerError):
    pass


def _probe_error(remote: RemoteHost, result: Result) -> str:
    python = remote.config.ssh.python
    tail = result.stderr_tail(3) or result.stdout[-500:]
    if result.exit_code == 127:
        return f"{python} not found on the host ([ssh] python): {tail}"
    if "SyntaxError" in tail:
        return f"{python} is too old to run the probe (deployer needs 3.9 or later): {tail}"
    return f"`{python} -c <probe>` exited with {result.exit_code}: {tail}"


def _config_values(text: str, path: str) -> dict[str, Any]:
    from deployer.hostapi.options import ConfigError, load_text

    try:
        return load_text(text, path)
    except ConfigError as e:
        return {"(unreadable)": str(e)}


def _shown(value: Any) -> str:
    return "unset" if value is None else mask_url(toml_value(value))


def config_changes(host_text: str, expected: str, path: str) -> list[str]:
    """Each master option (each env variable) that differs: on the host vs written now."""
    have, want = _config_values(host_text, path), _config_values(expected, path)
    changes = []
    for key in dict.fromkeys([*want, *have]):
        if key == "env":
            env_have, env_want = have.get("env") or {}, want.get("env") or {}
            for var in dict.fromkeys([*env_want, *env_have]):
                if env_have.get(var) != env_want.get(var):
                    changes.append(
                        f"env {var}: {_shown(env_have.get(var))} on the host, "
                        f"{_shown(env_want.get(var))} from the inventory"
                    )
        elif have.get(key) != want.get(key):
            changes.append(
                f"{key}: {_shown(have.get(key))} on the host, "
                f"{_shown(want.get(key))} from the inventory"
            )
    return changes


def drift(session: FleetSession, timeout: float) -> list[dict[str, Any]]:
    """`config --diff`: per host, what differs from what `deployer setup` would make of
    the inventory now: master.toml (its options, its env) and the agent."""

    def one(remote: RemoteHost) -> dict[str, Any]:
        roles = [r.name for r in remote.config.masters] or [None]
        rows = [compare(remote, run_probe(remote, None, timeout, role), role) for role in roles]
        first = rows[0]
        for other in rows[1:]:  # the agent's notes are the host's: said once
            first["notes"] += [n for n in other["notes"] if n not in first["notes"]]
            first["changes"] += other["changes"]
            first["diff"] += other["diff"]
            first["differs"] = first["differs"] or other["differs"]
        return first

    results, failures = session.each_within(session.names, one, timeout + 5)
    return [
        results[n]
        if n in results
        else {"host": n, "differs": True, "error": failures[n], "notes": [], "changes": []}
        for n in session.names
    ]


def compare(remote: RemoteHost, probe: answers.Probe, role: str | None = None) -> dict[str, Any]:
    """What on the host differs from what setup would write: the agent, and `role`'s
    master toml (a role's changes are prefixed with its name)."""
    notes: list[str] = []
    changes: list[str] = []
    diff: list[str] = []
    agent = probe.agent.state
    if agent == "differs":
        notes.append("the host agent is not this controller's (`deployer setup` installs it)")
    elif agent == "missing":
        notes.append("no host agent installed (`deployer setup`)")
    elif agent != "same":
        notes.append(f"the host agent could not be checked: {probe.agent.error}")
    master = remote.master_for(role)
    toml = probe.master_toml
    if master is None:
        notes.append("no [master] in the inventory: master.toml is not deployer's to compare")
    elif toml.error is not None:
        notes.append(f"master.toml could not be read: {toml.error}")
    elif not toml.exists or toml.text is None:
        notes.append(f"{toml.path} is missing (`deployer setup` writes it)")
    else:
        expected = to_toml(master)
        if toml.text != expected:
            path = str(toml.path)
            changes = config_changes(toml.text, expected, path)
            if not changes:
                changes = ["the text differs (comments, order or layout), not the options"]
            if role is not None:
                changes = [f"{role}: {c}" for c in changes]
            diff = [
                mask_url(line)
                for line in difflib.unified_diff(
                    toml.text.splitlines(),
                    expected.splitlines(),
                    fromfile=f"{remote.name}:{path}",
                    tofile="master.toml as `deployer setup` writes it now",
                    lineterm="",
                )
            ]
    differs = bool(changes) or any(not n.startswith("no [master]") for n in notes)
    return {
        "host": remote.name,
        "differs": differs,
        "error": None,
        "notes": notes,
        "changes": changes,
        "diff": diff,
    }
