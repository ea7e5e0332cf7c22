"""Directories and files only this user may read, on the controller: the state
directory (locks, history, rollout logs: who deployed what, when, from where) and
the keeper's socket directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from deployer.errors import BadInput, DeployerError

DIR_MODE = 0o700
FILE_MODE = 0o600


def not_ours(st: os.stat_result) -> str | None:
    """Why a directory with this lstat() is no place for our private files (a
    symlink, not a directory, another user's); None if it is ours."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    return None


def private_dir(path: Path, fix: str = "move it away") -> Path:
    """`path`, made with mode 0700 if missing; an existing one must be a real
    directory of ours (BadInput otherwise, `fix` saying what to do) and is
    tightened to 0700 if looser."""
    try:
        if not os.path.lexists(path):
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise DeployerError(f"{path}: cannot make the directory: {e.strerror}") from None
    why = not_ours(st)
    if why:
        raise BadInput(
            f"{path} {why}: deployer keeps its locks, history and logs only in a real "
            f"directory of your own ({fix})"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, DIR_MODE)  # older deployers made it 0755
    return path


def opener(path: str, flags: int) -> int:
    """For open(..., opener=): a new file is 0600, an existing looser one is made
    0600, a symlink is not followed (ELOOP)."""
    fd = os.open(path, flags | os.O_NOFOLLOW, FILE_MODE)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        os.fchmod(fd, FILE_MODE)
    return fd
