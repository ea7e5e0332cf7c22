"""What every operation shares: the error it raises, git in the object cache."""

from __future__ import annotations

import subprocess
from typing import Any

from deployer.hostapi.layout import Layout


class AgentError(Exception):
    """An operation failed; the message is for the operator."""


def _git(layout: Layout, *args: str, stdin: Any = None, capture: bool = True) -> str:
    proc = subprocess.run(
        ["git", f"--git-dir={layout.repo}", *args],
        stdin=stdin,
        capture_output=capture,
        text=False,
    )
    if proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip()
        raise AgentError(f"git {' '.join(args[:2])} failed: {err}")
    return (proc.stdout or b"").decode()
