"""Who may write where on a host: the checks that keep another local user out.

deploy_to and every directory of its layout must be real directories owned by
the user who deploys and not writable by anyone else; every directory above
deploy_to must be owned by root or that user, and sticky where others may
write (like /tmp). Then nobody but that user (and root) can plant a symlink or
swap a file anywhere the agent or the master writes, so the files they create
there cannot be redirected.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
from pathlib import Path


class UntrustedPath(Exception):
    """A path another local user could write: the message names it and its owner."""


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _private_group(gid: int, uid: int) -> bool:
    """The user's own group, with nobody else in it (umask 002 systems)."""
    try:
        group = grp.getgrgid(gid)
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return gid == user.pw_gid and set(group.gr_mem) <= {user.pw_name}


def _writable_by_others(st: os.stat_result, uid: int) -> bool:
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and not _private_group(st.st_gid, uid)


def check_ancestors(path: Path, what: str = "deploy_to") -> None:
    """Every directory above `path` (`what` names it in messages), symlinks followed:
    owned by root or us, and sticky if others may write in it."""
    uid = os.geteuid()
    seen = 0
    todo = list(reversed(Path(os.path.abspath(path)).parents))
    while todo:
        d = todo.pop(0)
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            return  # nothing below it exists yet
        if st.st_uid not in (0, uid):
            raise UntrustedPath(
                f"{d} (above {what} {path}) is owned by {user_name(st.st_uid)}: "
                f"whoever owns it can replace {what}; use a directory owned by root "
                f"or {user_name(uid)}"
            )
        if stat.S_ISLNK(st.st_mode):
            seen += 1
            if seen > 40:
                raise UntrustedPath(f"{d}: too many levels of symbolic links")
            target = Path(os.path.realpath(d))
            todo[:0] = [*reversed(target.parents), target]
            continue
        if _writable_by_others(st, uid) and not st.st_mode & stat.S_ISVTX:
            raise UntrustedPath(
                f"{d} (above {what} {path}) is writable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}) without the sticky bit: "
                f"anyone could replace {what}"
            )


def check_program(path: Path, what: str) -> None:
    """A program we are about to run (a deploy hook), as sshd's StrictModes checks
    authorized_keys: the file, and a symlink's target, owned by us or root and not
    writable by anyone else, nor any directory above either of them. Otherwise
    another local user could make us run their code."""
    uid = os.geteuid()
    check_ancestors(path, what)
    real = Path(os.path.realpath(path))
    if real != path:
        check_ancestors(real, what)
    st = os.stat(real)
    shown = f"{path}" if real == path else f"{path} (a symlink to {real})"
    if st.st_uid not in (0, uid):
        raise UntrustedPath(
            f"{what} {shown} is owned by {user_name(st.st_uid)}, not by {user_name(uid)}"
            f" or root: whoever owns it decides what runs; chown {user_name_only(uid)} {real}"
        )
    if _writable_by_others(st, uid):
        raise UntrustedPath(
            f"{what} {shown} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}):"
            f" anyone could change what runs; chmod go-w {real}"
        )


def user_name_only(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_dir(path: Path) -> None:
    """A directory of the layout: real, ours, not writable by anyone else."""
    uid = os.geteuid()
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        raise UntrustedPath(f"{path} is a symlink (to {target}): a directory is expected")
    if not stat.S_ISDIR(st.st_mode):
        raise UntrustedPath(f"{path} is not a directory")
    if st.st_uid != uid:
        raise UntrustedPath(
            f"{path} is owned by {user_name(st.st_uid)}, not by {user_name(uid)} who deploys"
        )
    if _writable_by_others(st, uid):
        raise UntrustedPath(
            f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w {path}"
        )


def secure_dirs(root: Path, dirs: list[Path], create: bool) -> list[Path]:
    """Check deploy_to and its layout; with `create`, make what is missing (0755,
    never through a symlink). Returns the directories created."""
    if create and not os.path.lexists(root):
        check_ancestors(root)  # before creating anything in them
        root.mkdir(mode=0o755, parents=True)
    check_ancestors(root)
    made = []
    for d in [root, *dirs]:
        if create and d != root:
            try:
                os.mkdir(d, 0o755)
                made.append(d)
            except FileExistsError:
                pass
        if create or os.path.lexists(d):
            check_dir(d)
    return made


def read_file(path: Path, limit: int = 1 << 24) -> bytes:
    """A file of the layout, read the way setup trusts it: never through a symlink
    (O_NOFOLLOW), a regular file of ours that nobody else may write, at most `limit`
    bytes. FileNotFoundError if there is none; UntrustedPath for the rest."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedPath(
                f"{path} is a symlink (to {os.readlink(path)}): not read, a file of the"
                " layout is never read through a link; remove it (`deployer setup` writes it)"
            ) from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        uid = os.geteuid()
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedPath(f"{path} is not a regular file: not read")
        if st.st_uid != uid:
            raise UntrustedPath(
                f"{path} is owned by {user_name(st.st_uid)}, not by {user_name(uid)} who"
                " deploys: not read"
            )
        if _writable_by_others(st, uid):
            raise UntrustedPath(
                f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): not"
                f" read; chmod go-w {path}"
            )
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UntrustedPath(f"{path} is larger than {limit} bytes: not read")
    return data


def write_file(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Replace `path` atomically with `data`, never through a symlink; False if it
    already held exactly that."""
    try:
        with open(path, "rb") as f:  # only after the directory was checked
            if f.read() == data:
                return False
    except FileNotFoundError:
        pass
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True
