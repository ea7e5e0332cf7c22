"""`deployer secrets`: a JSON object in shared/, mode 0600; values never answered."""

from __future__ import annotations

import json
import sys

from deployer.agent.ops.common import AgentError
from deployer.hostapi import answers, trust, workerenv
from deployer.hostapi.layout import Layout


def secrets(layout: Layout, action: str, key: str | None) -> answers.Secrets:
    """The host's secrets: a JSON object in shared/, mode 0600, that the master reads
    at each worker's start. `set` reads the value from stdin; no value is ever
    printed, answered or put in a message."""
    path = layout.secrets
    try:
        values = workerenv.load_secrets(str(path))
    except workerenv.EnvFileError as e:
        raise AgentError(f"{e}: fix or remove it") from None
    changed = False
    if action in ("set", "unset"):
        if not key or not workerenv.is_name(key):
            raise AgentError(f"secrets {action}: {key!r} is not a variable name")
        if action == "set":
            _check_settable(key)
            value = sys.stdin.read()
            value = value[:-1] if value.endswith("\n") else value
            if "\0" in value:
                raise AgentError(f"secrets set {key}: the value has a NUL byte")
            changed = values.get(key) != value
            values[key] = value
        else:
            changed = values.pop(key, None) is not None
        if changed:
            trust.write_file(path, json.dumps(values, sort_keys=True).encode(), 0o600)
    return answers.Secrets(sorted(values), changed)


def _check_settable(key: str) -> None:
    """A reserved name is refused here too, not only by the controller: another
    client of the agent (or an older controller) must not plant one."""
    why = workerenv.reserved(key)
    if why:
        raise AgentError(f"secrets set {key}: {why}; pick another name")
