"""Host operations. Each returns its typed answer (hostapi.answers) or raises AgentError.

Standard library only: this runs on the hosts from the zipapp `deployer setup`
uploads. Nothing that serves traffic changes before `switch`: a release is
built under a temporary name and renamed into place only when complete. One
module per concern; the names are re-exported here, for the agent's CLI,
and imported on first use: an agent call pays only for the modules its op needs.
"""

from __future__ import annotations

import importlib

# Not here: the functions named like their module (lock, secrets, setup). Importing
# a submodule binds its name in this package, so `ops.lock` would be the module
# once anything imported it; callers import those from their module.
_WHERE = {
    "AgentError": "common",
    "_git": "common",
    "_LOG_STAMP": "day2",
    "LOG_ALIVE_S": "day2",
    "LOG_BLOCK": "day2",
    "LOG_DRAIN_S": "day2",
    "LOG_MAX_LINE": "day2",
    "_backlog": "day2",
    "_complete_end": "day2",
    "_follow": "day2",
    "_ino": "day2",
    "_open_log": "day2",
    "_stamp": "day2",
    "_stdin_closed": "day2",
    "_Tail": "day2",
    "app_env": "day2",
    "exec_in_current": "day2",
    "logs": "day2",
    "_read_owner": "lock",
    "_stale": "lock",
    "_take_over": "lock",
    "WATCH_POLL": "probes",
    "_check_master": "probes",
    "_Deadline": "probes",
    "_master_status": "probes",
    "_master_summary": "probes",
    "_probe": "probes",
    "deadline": "probes",
    "health": "probes",
    "status": "probes",
    "watch": "probes",
    "workers": "probes",
    "_build": "release",
    "_disk_full": "release",
    "_extract": "release",
    "_in_release": "release",
    "_link_shared": "release",
    "_revision": "release",
    "check_layout": "release",
    "current_release": "release",
    "have": "release",
    "master_state": "release",
    "prepare": "release",
    "prune": "release",
    "receive": "release",
    "receive_and_prepare": "release",
    "record": "release",
    "releases": "release",
    "state": "release",
    "switch": "release",
    "WRAPPER": "setup",
    "_config_changes": "setup",
    "_own_zipapp": "setup",
    "wrapper_script": "setup",
    "LINGER_DIR": "units",
    "SYSTEMD_ROOT_ENV": "units",
    "_host_master_config": "units",
    "_linger": "units",
    "_remove_unit": "units",
    "_start_unit": "units",
    "_Systemd": "units",
    "_systemd_booted": "units",
    "_write_record": "units",
    "_boot_problem": "units",
    "boot_status": "units",
    "lifecycle": "units",
    "unit": "units",
}


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
