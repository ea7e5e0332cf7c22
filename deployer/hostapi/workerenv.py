"""The workers' environment: which keys are variable names, which names belong to
the master and to deployer (no [env] table and no secret may set them), and the
secrets file (env_file) as the master and `deployer exec` read it.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The master sets these for every worker that has a socket or a notify socket; a
# value of ours would reach a worker that has neither (no `listen`, ready = "pipe")
# and make it adopt an fd or a socket it does not have.
MASTER_SETS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
# deployer's own: DEPLOYER_RELEASE, DEPLOYER_WORKER_ID, DEPLOYER_READY_FD, ...
OWN_PREFIX = "DEPLOYER_"


def is_name(key: str) -> bool:
    return NAME.fullmatch(key) is not None


def reserved(name: str) -> str | None:
    """Why `name` may not be set by [env] or a secret; None if it may."""
    if name in MASTER_SETS:
        return "set by the master for every worker"
    if name.startswith(OWN_PREFIX):
        return f"{OWN_PREFIX}* names are deployer's own (DEPLOYER_RELEASE, DEPLOYER_WORKER_ID, ...)"
    return None


class EnvFileError(Exception):
    """A secrets file that cannot be used; the message names the file, never a value."""


class EnvFile(NamedTuple):
    values: dict[str, str]
    dropped: tuple[str, ...]  # reserved names the file held, left out


def load_secrets(path: str) -> dict[str, str]:
    """The secrets file at `path` as it is ({} if missing), read as every layout file
    is (trust.read_file: never through a link, the deploy user's own, 1 MiB at most):
    a link planted in shared/ would hand another file's content to the workers."""
    from pathlib import Path

    from deployer.hostapi import trust

    try:
        data = json.loads(trust.read_file(Path(path), 1 << 20).decode())
    except FileNotFoundError:
        return {}
    except trust.UntrustedPath as e:
        raise EnvFileError(f"env_file {e}") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        why = e.strerror if isinstance(e, OSError) else "not valid JSON"
        raise EnvFileError(f"env_file {path}: {why}") from None
    if not isinstance(data, dict):
        raise EnvFileError(f"env_file {path}: not a JSON object")
    return {str(k): str(v) for k, v in data.items()}


def read_env_file(path: str) -> EnvFile:
    """The variables of the secrets file at `path` (none if it is missing).

    Reserved names are left out and listed in `dropped`: `deployer secrets set`
    refuses them, so one here was written by hand or by an older deployer, and it
    must reach neither a worker nor a `deployer exec` command."""
    values = load_secrets(path)
    dropped = tuple(sorted(k for k in values if reserved(k)))
    return EnvFile({k: v for k, v in values.items() if k not in dropped}, dropped)


def dropped_note(path: str, dropped: tuple[str, ...]) -> str:
    """What to say (master log, exec's stderr) about reserved names left out."""
    return (
        f"env_file {path}: ignored {', '.join(dropped)} (reserved: the master and deployer "
        "set these; `deployer secrets unset` them)"
    )
