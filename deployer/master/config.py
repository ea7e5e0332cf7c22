"""Master options: one dataclass, filled from the [master] section of a TOML
file, then overridden by flags. Every problem is a ConfigError whose message
names the option and says what was expected (the CLI exits 2 with it).
"""

from __future__ import annotations

import os
import shlex
import signal
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

READY_MODES = ("notify", "pipe", "delay:SECONDS")


class ConfigError(ValueError):
    """Bad input: the message names the option and what was expected."""


@dataclass(frozen=True)
class Readiness:
    """How a worker tells it is ready: notify (sd_notify), pipe, or a delay."""

    mode: str = "notify"
    delay: float = 0.0

    def __str__(self) -> str:
        return f"delay:{self.delay:g}" if self.mode == "delay" else self.mode


@dataclass
class MasterConfig:
    command: list[str] = field(default_factory=list)
    workers: int = 0  # 0 = not set yet; resolved to "auto" (cpu count) by finish()
    listen: str | None = None
    cwd: str | None = None
    ready: Readiness = field(default_factory=Readiness)
    ready_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    stop_signal: int = signal.SIGTERM
    ready_soak: float = 1.0
    reload_batch: int = 1
    listen_fds: int = 1  # copies of the socket per worker: fds 3.., LISTEN_FDS=N
    socket: str | None = None
    log: str | None = None
    pidfile: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly view (status and the state handed over on upgrade)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["ready"] = str(self.ready)
        out["stop_signal"] = signal.Signals(self.stop_signal).name
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; from_dict() gives the same config back (upgrade state)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["ready"] = {"mode": self.ready.mode, "delay": self.ready.delay}
        out["stop_signal"] = int(self.stop_signal)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MasterConfig:
        data = dict(data)
        data["ready"] = Readiness(**data["ready"])
        return cls(**data)


# --- parsers for single values; `what` is the option name used in messages ---


def parse_workers(value: Any, what: str = "--workers") -> int:
    if value == "auto":
        return os.cpu_count() or 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise ConfigError(f"{what}: expected a positive integer or 'auto', got {value!r}")
    return n


def parse_positive_int(value: Any, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if isinstance(value, bool) or n < 1 or str(n) != str(value).strip():
        raise ConfigError(f"{what}: expected a positive integer, got {value!r}")
    return n


MAX_LISTEN_FDS = 64


def parse_listen_fds(value: Any, what: str = "--listen-fds") -> int:
    n = parse_positive_int(value, what)
    if n > MAX_LISTEN_FDS:
        raise ConfigError(f"{what}: expected at most {MAX_LISTEN_FDS}, got {value!r}")
    return n


def parse_seconds(value: Any, what: str, allow_zero: bool = True) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = -1.0
    if isinstance(value, bool) or s < 0 or (s == 0 and not allow_zero) or s != s:
        low = "a number of seconds >= 0" if allow_zero else "a number of seconds > 0"
        raise ConfigError(f"{what}: expected {low}, got {value!r}")
    return s


def parse_signal(value: Any, what: str = "--stop-signal") -> int:
    name = str(value).strip().upper()
    if name.isdigit():
        try:
            return signal.Signals(int(name)).value
        except ValueError:
            pass
    else:
        name = name if name.startswith("SIG") else "SIG" + name
        if name in signal.Signals.__members__:
            return signal.Signals[name].value
    raise ConfigError(
        f"{what}: unknown signal {value!r} (expected a name like SIGTERM, SIGINT, SIGQUIT)"
    )


def parse_ready(value: Any, what: str = "--ready") -> Readiness:
    text = str(value).strip()
    if text in ("notify", "pipe"):
        return Readiness(text)
    if text.startswith("delay:"):
        return Readiness("delay", parse_seconds(text[6:], what))
    raise ConfigError(f"{what}: expected one of {', '.join(READY_MODES)}, got {value!r}")


def parse_listen(value: Any, what: str = "--listen") -> str:
    """HOST:PORT, [IPv6]:PORT, :PORT (all interfaces) or unix:PATH."""
    text = str(value).strip()
    if text.startswith("unix:") and len(text) > 5:
        return text
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and 0 < int(port) < 65536:
        return text
    raise ConfigError(
        f"{what}: expected HOST:PORT (like 127.0.0.1:8000) or unix:PATH, got {value!r}"
    )


def parse_command(value: Any, what: str = "command") -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{what}: expected a string or a list of strings, got {value!r}")


def parse_env(value: Any, what: str = "env") -> dict[str, str]:
    if isinstance(value, dict) and all(isinstance(v, str | int | float) for v in value.values()):
        return {str(k): str(v) for k, v in value.items()}
    raise ConfigError(f'{what}: expected a table of NAME = "value", got {value!r}')


def _path(base: Path):
    """Relative paths in a config file are relative to that file's directory."""
    return lambda value, what: str((base / str(value)).absolute())


# TOML key -> parser(value, what). Flags use the same parsers (see cli.py).
def _file_keys(base: Path) -> dict[str, Any]:
    path = _path(base)
    return {
        "command": parse_command,
        "workers": parse_workers,
        "listen": parse_listen,
        "cwd": path,
        "ready": parse_ready,
        "ready_timeout": lambda v, w: parse_seconds(v, w, allow_zero=False),
        "shutdown_timeout": parse_seconds,
        "stop_signal": parse_signal,
        "ready_soak": parse_seconds,
        "reload_batch": parse_positive_int,
        "listen_fds": parse_listen_fds,
        "socket": path,
        "log": path,
        "pidfile": path,
        "env": parse_env,
    }


def load_file(path: str) -> dict[str, Any]:
    """The [master] section of a TOML file as parsed option values."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    section = data.get("master", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [master] must be a table")
    keys = _file_keys(p.parent.absolute())
    out: dict[str, Any] = {}
    for key, value in section.items():
        if key not in keys:
            known = ", ".join(sorted(keys))
            raise ConfigError(f"{path}: [master] {key}: unknown key (known keys: {known})")
        out[key] = keys[key](value, f"{path}: [master] {key}")
    return out


def build(file_values: dict[str, Any], flag_values: dict[str, Any]) -> MasterConfig:
    """Defaults <- config file <- flags; then the checks that need everything."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    cfg = replace(MasterConfig(), **merged)
    if cfg.workers == 0:
        cfg.workers = parse_workers("auto")
    if not cfg.command:
        raise ConfigError(
            "missing command: give it after -- (e.g. `run --listen 127.0.0.1:8000 -- node app.js`)"
            " or as `command` in the [master] section of --config"
        )
    return cfg
