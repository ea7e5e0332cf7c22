"""The master's configuration as it runs: the [master] section of a TOML file
(master.toml), then flags over it. The options themselves, their checks and
defaults, are the table in deployer.hostapi.options.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from deployer.hostapi.checks import Invalid, Readiness, from_text
from deployer.hostapi.options import ConfigError, MasterConfig, load_text
from deployer.hostapi.options import build as layer

__all__ = [
    "ConfigError",
    "MasterConfig",
    "Readiness",
    "build",
    "load_file",
    "load_layout_file",
    "load_text",
    "parse_flag_number",
]


def load_file(path: str) -> dict[str, Any]:
    """The [master] section of a TOML file as checked option values; relative
    paths in it are relative to the file's directory."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path} is not UTF-8: {e}") from None
    return load_text(text, path)


def load_layout_file(path: Path) -> dict[str, Any]:
    """load_file() of the layout's master.toml as the agent reads it: never through a
    symlink, only a file of the deploy user's (trust.read_file)."""
    from deployer.hostapi import trust

    try:
        data = trust.read_file(path, 1 << 20)
    except trust.UntrustedPath as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        return load_text(data.decode(), str(path))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8: {e}") from None


def build(file_values: dict[str, Any], flag_values: dict[str, Any]) -> MasterConfig:
    """Defaults <- config file <- flags; then what the master needs to run: the
    command as argv, "auto" workers as this machine's CPU count."""
    cfg = layer(file_values, flag_values)
    if not cfg.command:
        raise ConfigError(
            "missing command: give it after -- (e.g. `run --listen 127.0.0.1:8000 -- node app.js`)"
            " or as `command` in the [master] section of --config"
        )
    return replace(cfg, command=tuple(cfg.argv), workers=cfg.worker_count())


def parse_flag_number(text: str, what: str, check: Any) -> Any:
    """A client flag (`scale N`, `--timeout S`) through one of the shared checks."""
    try:
        return check(from_text(text))
    except Invalid as e:
        raise ConfigError(f"{what}: expected {e.expected}, got {text!r}") from None
