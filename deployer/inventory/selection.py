"""Hosts by `--hosts` globs and roles by `--roles`; paths of the inventory's."""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from deployer.errors import HostSelectionError

Host = TypeVar("Host")  # a HostConfig (sections.py); any value keyed by host name


def select_hosts(hosts: dict[str, Host], patterns: str | None) -> list[Host]:
    """`web*,db1,!web3`: names and globs, comma-separated; `!pattern` excludes.

    Every positive pattern must match something: a typo in a deploy command
    should stop it, not silently deploy to fewer hosts.
    """
    names = list(hosts)
    if patterns is None or not patterns.strip():
        return list(hosts.values())
    parts = [p.strip() for p in patterns.split(",") if p.strip()]
    include = [p for p in parts if not p.startswith("!")]
    exclude = [p[1:] for p in parts if p.startswith("!")]
    known = ", ".join(names) or "(none)"
    for p in include:
        if not fnmatch.filter(names, p):
            raise HostSelectionError(
                f"--hosts: {p!r} matches no host{suggest(p, names)}; known hosts: {known}"
            )
    chosen = [n for n in names if not include or any(fnmatch.fnmatchcase(n, p) for p in include)]
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not chosen:
        raise HostSelectionError(f"--hosts: {patterns!r} selects no host; known hosts: {known}")
    return [hosts[n] for n in chosen]


def select_roles(defined: Iterable[str], patterns: str) -> list[str]:
    """`--roles web,worker` (globs too): every pattern must name a role."""
    known = list(defined)
    if not known:
        raise HostSelectionError("--roles: the inventory defines no [roles]")
    chosen: list[str] = []
    for p in (p.strip() for p in patterns.split(",") if p.strip()):
        matched = fnmatch.filter(known, p)
        if not matched:
            raise HostSelectionError(
                f"--roles: {p!r} matches no role{suggest(p, known)}; roles: {', '.join(known)}"
            )
        chosen += [m for m in matched if m not in chosen]
    return chosen


def expand_path(p: str, base: str | os.PathLike[str] | None = None) -> Path:
    """A controller-side path from the inventory: ~ expanded, relative to the inventory."""
    path = Path(os.path.expanduser(p))
    if not path.is_absolute() and base is not None:
        path = Path(base).parent / path
    return path


def suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
