"""The master's options: one table row per key.

Each row feeds the inventory's [master] validation, the host's master.toml
(written by the controller, read by the master), the `deployer master` flags,
the systemd unit's ExecStart and the documentation in inventory.example.toml.
Adding an option is adding a row (and a field of MasterConfig with its name).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

from deployer.hostapi import checks
from deployer.hostapi.checks import Command, Invalid, Readiness


class ConfigError(ValueError):
    """Bad master configuration: the message names the option and what was expected."""


MAX_LISTEN_FDS = 64  # file descriptors 3..66: systemd's own socket-activation code allows more


@dataclass(frozen=True)
class Option:
    key: str
    check: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"
    inventory: bool = True  # set in the inventory's [master]; else the host layout decides
    required: bool = False  # required in the inventory
    expand: bool = False  # {host} and {address} expand in it, per host
    is_path: bool = False  # relative to the config file's directory; a flag's to the cwd
    flag: bool = True  # has a `deployer master run|start|unit` flag
    example: Any = None  # the value inventory.example.toml shows (default: the default)
    # Written to master.toml and the upgrade state only when not at its default, so
    # that a master of an older version reads both still: every option added later.
    omit_default: bool = False
    # How a running master takes a new value (deployer setup): "upgrade" (re-exec'd
    # in place with it), "restart" (bound or named at its start: only a restart),
    # "scale" (workers: by scaling), "setup" (setup's own; nothing for the master).
    taken_by: str = "upgrade"

    @property
    def flag_name(self) -> str:
        return "--" + self.key.replace("_", "-")

    def parse(self, value: Any, where: str) -> Any:
        """The checked value; ConfigError naming `where` (a flag, a file's key)."""
        try:
            return self.check(value)
        except Invalid as e:
            raise ConfigError(f"{where}: {e}") from None

    def flag_text(self, value: Any) -> str:
        """The flag's argument for a checked value (the unit's ExecStart)."""
        if isinstance(value, signal.Signals):
            return value.name
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def parse_flag(self, text: str) -> Any:
        """A flag's text; the message quotes the text as typed."""
        if self.is_path:
            return os.path.abspath(self.parse(text, self.flag_name))
        try:
            return self.check(checks.from_text(text))
        except Invalid as e:
            raise ConfigError(f"{self.flag_name}: expected {e.expected}, got {text!r}") from None


OPTIONS: tuple[Option, ...] = (
    Option(
        "command",
        checks.command,
        "the worker command (string: run by /bin/sh; array: no shell)",
        required=True,
        expand=True,
        flag=False,  # given after `--` on the command line
        example="node server.js",
    ),
    Option(
        "workers",
        checks.workers,
        'integer >= 1, or "auto" (one per CPU)',
        "N|auto",
        taken_by="scale",
    ),
    Option(
        "listen",
        checks.listen,
        "HOST:PORT or unix:/path, bound once by the master and shared as fd 3; without it"
        " the master binds nothing (queue consumers: no fd 3, no LISTEN_*)",
        "HOST:PORT",
        expand=True,
        example="{address}:3000",
        taken_by="restart",
    ),
    Option(
        "ready",
        checks.ready,
        '"notify" (sd_notify READY=1), "pipe" (DEPLOYER_READY_FD), or "delay:SECONDS"',
        "MODE",
        example="pipe",
    ),
    Option(
        "stop_signal",
        checks.stop_signal,
        "sent to an old worker to make it drain",
        "SIG",
    ),
    Option(
        "shutdown_timeout",
        checks.seconds(0.0, inclusive=True),
        "seconds a draining worker gets before SIGKILL",
        "S",
    ),
    Option(
        "ready_timeout",
        checks.seconds(),
        "seconds a new worker gets to become ready, or the reload aborts",
        "S",
    ),
    Option(
        "ready_soak",
        checks.seconds(0.0, inclusive=True),
        "seconds a new worker must stay alive after ready",
        "S",
    ),
    Option(
        "reload_batch",
        checks.reload_batch,
        'workers replaced at a time during a reload: N, or "P%" of the workers',
        "N|P%",
        omit_default=True,  # an older master reads no "100%"
    ),
    Option(
        "listen_fds",
        checks.integer(1, MAX_LISTEN_FDS),
        "copies of the socket per worker (fds 3.., LISTEN_FDS=N); Node: 64, see README",
        "N",
    ),
    Option(
        "nonblocking",
        checks.boolean,
        "O_NONBLOCK on the shared socket (systemd's NonBlocking=): a worker that polls then"
        " accepts, like Python's socketserver, never hangs in accept() when it drains",
        "true|false",
        omit_default=True,
    ),
    Option(
        "supervisor",
        checks.choice("auto", "systemd", "none"),
        'what brings the master back after a reboot: "systemd" (setup installs and enables'
        ' a unit, or fails), "auto" (a unit where systemd is, else setup says it is not)'
        ' or "none"',
        "auto|systemd|none",
        flag=False,  # read by `deployer setup`, not by the master
        omit_default=True,
        taken_by="setup",
    ),
    Option(
        "cwd",
        checks.path,
        "workers' directory; a symlink is resolved at each reload",
        "DIR",
        inventory=False,
        is_path=True,
        taken_by="restart",
    ),
    Option(
        "socket",
        checks.path,
        "control socket (unix, mode 0600)",
        "PATH",
        inventory=False,
        is_path=True,
        taken_by="restart",
    ),
    Option(
        "pidfile",
        checks.path,
        "write the master's pid here",
        "PATH",
        inventory=False,
        is_path=True,
        taken_by="restart",
    ),
    Option(
        "log",
        checks.path,
        "master and worker log (default: stderr; SIGUSR1 reopens)",
        "FILE",
        inventory=False,
        is_path=True,
        taken_by="restart",
    ),
    Option(
        "env",
        checks.env,
        "environment for the workers",
        inventory=False,
        flag=False,
    ),
    Option(
        "env_file",
        checks.path,
        "a JSON object of environment variables (secrets) read at each worker's start",
        "FILE",
        inventory=False,
        is_path=True,
        omit_default=True,
    ),
)
BY_KEY = {o.key: o for o in OPTIONS}
INVENTORY_OPTIONS = tuple(o for o in OPTIONS if o.inventory)
FLAG_OPTIONS = tuple(o for o in OPTIONS if o.flag)


def taken_by(how: str) -> tuple[str, ...]:
    """The keys a running master takes that way (Option.taken_by), in table order."""
    return tuple(o.key for o in OPTIONS if o.taken_by == how)


LAYOUT_KEYS = frozenset(o.key for o in OPTIONS if not o.inventory)  # the layout sets them


@dataclass(frozen=True)
class MasterConfig:
    """One master's configuration, on both sides: the inventory's [master] for a
    host (paths unset), master.toml (paths set by the layout), the flags."""

    command: Command = ()
    workers: int | str = "auto"  # "auto": one per CPU of the host, resolved there
    listen: str | None = None
    ready: Readiness = Readiness()
    stop_signal: signal.Signals = signal.SIGTERM
    shutdown_timeout: float = 30.0
    ready_timeout: float = 60.0
    ready_soak: float = 0.5
    # all at once, as gunicorn's HUP and unicorn's USR2: a reload takes one boot, not
    # one a worker; the host briefly runs twice the workers (1 or "25%" where memory
    # cannot hold that)
    reload_batch: int | str = "100%"
    listen_fds: int = 1
    nonblocking: bool = False
    supervisor: str = "auto"  # "auto" | "systemd" | "none": see deployer setup
    cwd: str | None = None
    socket: str | None = None
    pidfile: str | None = None
    log: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    env_file: str | None = None

    @property
    def argv(self) -> list[str]:
        return checks.command_argv(self.command)

    def worker_count(self, cpus: int | None = None) -> int:
        if self.workers == "auto":
            return cpus or os.cpu_count() or 1
        return int(self.workers)

    def reload_bound(self, cpus: int | None = None) -> float:
        """Seconds starting or reloading every worker may take at the worst (one at a
        time: ready_timeout and soak each), the last one drained, and a margin: what
        the controller waits for, and the unit's ExecReload is given."""
        per_worker = self.ready_timeout + self.ready_soak
        return self.worker_count(cpus) * per_worker + self.shutdown_timeout + 30

    def items(self) -> Iterator[tuple[Option, Any]]:
        """The options that are set, in table order."""
        for option in OPTIONS:
            value = getattr(self, option.key)
            if value is not None and value != {} and value != () and not self._omitted(option):
                yield option, value

    def _omitted(self, option: Option) -> bool:
        return option.omit_default and getattr(self, option.key) == _DEFAULTS[option.key]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; from_dict() gives the same config back (upgrade state)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for option in OPTIONS:
            if self._omitted(option):
                del out[option.key]
        out["command"] = list(self.argv) if self.command else []
        out["ready"] = {"mode": self.ready.mode, "delay": self.ready.delay}
        out["stop_signal"] = int(self.stop_signal)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MasterConfig:
        data = dict(data)
        data["command"] = tuple(data.get("command") or ())
        data["ready"] = Readiness(**data["ready"])
        data["stop_signal"] = signal.Signals(data["stop_signal"])
        return cls(**data)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly view for status."""
        out = self.to_dict()
        out["ready"] = str(self.ready)
        out["stop_signal"] = self.stop_signal.name
        return out


_DEFAULTS = {f.name: getattr(MasterConfig(), f.name) for f in fields(MasterConfig)}


# --- master.toml ----------------------------------------------------------------------

HEADER = "# written by `deployer setup` from the inventory; edits are overwritten"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, signal.Signals):
        return json.dumps(value.name)
    if isinstance(value, Readiness):
        return json.dumps(str(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def to_toml(cfg: MasterConfig) -> str:
    """master.toml: every option that is set, in table order; the command as argv."""
    lines = [HEADER, "[master]"]
    for option, value in cfg.items():
        shown = cfg.argv if option.key == "command" else value
        lines.append(f"{option.key} = {toml_value(shown)}")
    return "\n".join(lines) + "\n"


def from_table(section: dict[str, Any], where: str, base: str | None = None) -> dict[str, Any]:
    """A [master] table's values, checked; paths made absolute against `base`."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        option = BY_KEY.get(key)
        if option is None:
            known = ", ".join(sorted(BY_KEY))
            raise ConfigError(f"{where} {key}: unknown key (known keys: {known})")
        out[key] = option.parse(value, f"{where} {key}")
        if option.is_path and base is not None:
            out[key] = os.path.normpath(os.path.join(base, out[key]))
    return out


def build(*layers: dict[str, Any]) -> MasterConfig:
    """Defaults <- each layer in turn (a file, then flags); None means unset."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    return replace(MasterConfig(), **merged)


# --- documentation --------------------------------------------------------------------


def example_lines() -> list[str]:
    """The [master] section of inventory.example.toml, from the table."""
    lines = ["[master]"]
    for o in INVENTORY_OPTIONS:
        value = o.example if o.example is not None else getattr(MasterConfig(), o.key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        text = f"{o.key} = {toml_value(value)}"
        note = ("required: " if o.required else "") + o.help
        lines.append(f"{text:<38} # {note}")
    return lines


def load_text(text: str, path: str) -> dict[str, Any]:
    """The [master] section of master.toml's `text` as checked option values (`path`
    names it and anchors relative paths): the master's --config, the agent's and the
    controller's comparisons read it the same way."""
    try:  # here: only a reader of a file needs it
        import tomllib
    except ImportError:  # Python < 3.11: the same parser, vendored
        from deployer._vendor import tomli as tomllib

    from pathlib import Path

    p = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    section = data.get("master", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [master] must be a table")
    return from_table(section, f"{path}: [master]", base=str(p.parent.absolute()))
