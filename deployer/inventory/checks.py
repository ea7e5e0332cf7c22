"""Inventory values beyond the shared checkers (deployer.hostapi.checks): counts
or percentages of hosts, URLs, names, paths; and `key`, a field with its checker."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field
from typing import Any
from urllib.parse import urlsplit

from deployer.hostapi import checks
from deployer.hostapi.checks import (
    Checker,
    Invalid,
    integer,
    string,
)
from deployer.hostapi.checks import describe as _describe
from deployer.hostapi.checks import fail as _fail

# Upper bounds: beyond them a value is a typo (or hostile), not a setting; they
# also keep thread pools and loops sized by the inventory finite.
MAX_HOSTS = 10_000  # canary, batch sizes, max_failed: counts of hosts
MAX_PARALLEL = 256  # hosts prepared at once: one thread and one SSH connection each
MAX_KEEP_RELEASES = 1000
MAX_PASSES = 1000
MAX_NAME = 100  # the app name ends up in file names (locks, units)


def number(minimum: float = 0.0) -> Checker:
    return checks.seconds(minimum)


def count_or_percent(v: Any, *, minimum: int) -> int | str:
    """An int, or "N%" with 0 < N <= 100 (a percentage of the selected hosts)."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", v)
        if m and 0 < float(m.group(1)) <= 100:
            return f"{m.group(1)}%"
        return _fail("a percentage between 1% and 100%", v)
    try:
        return integer(minimum, MAX_HOSTS)(v)
    except Invalid as e:
        raise Invalid(f'{e} (or a percentage like "25%")', e.expected) from None


def batch(v: Any) -> tuple[int | str, ...]:
    """`batch = 2`, `batch = "25%"` or a ramp `batch = [1, "10%", "100%"]`."""
    items = v if isinstance(v, list) else [v]
    if not items:
        return _fail("a batch size or a non-empty ramp list", v)
    try:
        return tuple(count_or_percent(x, minimum=1) for x in items)
    except Invalid as e:
        raise Invalid(f"{e} (batch is an integer, a percentage, or a list of them)") from None


def max_failed(v: Any) -> int | str:
    return 0 if v == 0 else count_or_percent(v, minimum=0)


def url(v: Any) -> str:
    s = string(v)
    if not re.match(r"https?://[^/\s]+", s) or url_host(s) is None:
        return _fail("an http:// or https:// URL", v)
    return s


def url_host(u: str) -> str | None:
    """The host part of a URL (lowercase, no brackets), None if it has none or is garbled."""
    try:
        parts = urlsplit(u)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return None
    return parts.hostname or None


_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")


def app_name(v: Any) -> str:
    """The app's name: it names files on the controller and the hosts (the deploy
    lock, units), so nothing that could be a path ('/', '..') or an option ('-x')."""
    s = string(v)
    if not _NAME.fullmatch(s):
        return _fail(
            f"a name of letters, digits, '.', '_' and '-', not starting with '.' or '-', "
            f"at most {MAX_NAME} characters",
            v,
        )
    return s


def shared_paths(v: Any) -> tuple[str, ...]:
    """[app] shared: paths relative to the release (and to shared/); refused here, before
    any host is touched, rather than at prepare on every host."""
    if not isinstance(v, list):
        return _fail("an array of relative paths", v)
    for entry in v:
        if not isinstance(entry, str) or not entry.strip() or "\0" in entry:
            raise Invalid(f"entry {_describe(entry)}: expected a non-empty path without NUL")
        parts = entry.strip("/").split("/")
        if entry.startswith("/") or any(p in (".", "..") for p in parts):
            raise Invalid(
                f"entry {entry!r}: expected a relative path inside the release "
                "(no leading '/', no '.' or '..' parts)"
            )
    return tuple(v)


def database(v: Any) -> str:
    s = string(v)
    if not (s.startswith("sqlite:///") or re.match(r"postgres(ql)?://", s)):
        return _fail('"sqlite:///PATH" or "postgresql://..."', checks.mask_url(s))
    return s


def host_address(v: Any) -> str:
    s = string(v)
    if re.search(r"[\s/@]", s):
        return _fail("a host name or IP address (no spaces, '/' or '@')", v)
    return s


REQUIRED = dataclasses.MISSING


def key(check: Checker, default: Any = REQUIRED, *, expand: bool = False) -> Any:
    """A config key: its checker, its default, and whether {host}/{address} expand in it."""
    if isinstance(default, list | dict):
        raise TypeError("mutable default")
    return field(default=default, metadata={"check": check, "expand": expand})
