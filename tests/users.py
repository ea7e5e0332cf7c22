"""A second, unprivileged local user, for the protections that keep other users out
(a deploy_to she planted, the keeper's socket). Creating her needs root; the
`other` fixture (conftest.py) hands her to a test."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

OTHER = "deployer-other"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates a second unix user")


def other_user() -> pwd.struct_passwd:
    """She, created if missing (another test session may be creating her now)."""
    try:
        return pwd.getpwnam(OTHER)
    except KeyError:
        subprocess.run(
            ["useradd", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER],
            capture_output=True,
        )
        return pwd.getpwnam(OTHER)


def as_user(
    user: pwd.struct_passwd, *argv: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `argv` as `user` alone (her uid and gid, no supplementary groups)."""
    return subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *argv],
        check=check,
        capture_output=True,
        text=True,
    )
