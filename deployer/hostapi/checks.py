"""Value checkers: value -> normalized value, or Invalid("expected ..., got ...").

One set for the inventory, master.toml and the master's flags, so a key means
the same thing wherever it is written. A flag's text is first read as a number
where it looks like one (`from_text`), then goes through the same checker.
"""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Callable
from typing import Any, NamedTuple, Union

from deployer.hostapi import workerenv

Checker = Callable[[Any], Any]
Command = Union[str, tuple[str, ...]]  # evaluated: hosts run 3.9 (no `X | Y`)

MAX_SECONDS = 7 * 24 * 3600.0  # a week: beyond it a duration is a typo, not a setting


class Invalid(ValueError):
    """A checker's verdict: the text says what was expected and what was given."""

    def __init__(self, message: str, expected: str = "") -> None:
        super().__init__(message)
        self.expected = expected


def describe(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def fail(expected: str, value: Any) -> Any:
    raise Invalid(f"expected {expected}, got {describe(value)}", expected)


def from_text(text: str) -> Any:
    """A flag's text as the value a TOML file would give: 4 -> 4, 2.5 -> 2.5, true."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _is_int(v: Any) -> bool:
    # bool is an int subclass in Python; `workers = true` is a mistake, not 1
    return isinstance(v, int) and not isinstance(v, bool)


def integer(minimum: int = 0, maximum: int | None = None) -> Checker:
    expected = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")

    def check(v: Any) -> int:
        if not _is_int(v) or v < minimum or (maximum is not None and v > maximum):
            return fail(expected, v)
        return v

    return check


def seconds(minimum: float = 0.0, inclusive: bool = False, maximum: float = MAX_SECONDS) -> Checker:
    low = ">=" if inclusive else ">"
    expected = f"a number of seconds {low} {minimum:g} and <= {maximum:g}"

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return fail(expected, v)
        if v < minimum or (v == minimum and not inclusive) or v > maximum:
            return fail(expected, v)
        return float(v)

    return check


def string(v: Any) -> str:
    if not isinstance(v, str) or not v.strip() or "\0" in v:
        return fail("a non-empty string", v)
    return v


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        return fail("true or false", v)
    return v


def string_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(
        isinstance(x, str) and x.strip() and "\0" not in x for x in v
    ):
        return fail("an array of non-empty strings", v)
    return tuple(v)


def choice(*options: str) -> Checker:
    wanted = " or ".join(repr(o) for o in options)

    def check(v: Any) -> str:
        if v not in options:
            return fail(wanted, v)
        return v

    return check


def command(v: Any) -> Command:
    """A shell string (run by /bin/sh), or an argument list run without a shell."""
    if isinstance(v, (list, tuple)):
        return string_list(v) if v else fail("a non-empty command", v)
    return string(v)


def command_argv(cmd: Command) -> list[str]:
    """What the master execs: a string command through /bin/sh, `exec` so signals
    reach the program and not the shell."""
    return ["/bin/sh", "-c", f"exec {cmd}"] if isinstance(cmd, str) else list(cmd)


MAX_WORKERS = 1024


def workers(v: Any) -> int | str:
    if v == "auto" or (_is_int(v) and 1 <= v <= MAX_WORKERS):
        return v
    return fail(f"a positive integer (at most {MAX_WORKERS}) or 'auto'", v)


def reload_batch(v: Any) -> int | str:
    """Workers replaced at a time: a count, or "N%" of the master's workers."""
    if _is_int(v) and 1 <= v <= MAX_WORKERS:
        return v
    if isinstance(v, str) and v.endswith("%"):
        try:
            share = float(v[:-1])
        except ValueError:
            share = 0.0
        if 0 < share <= 100:
            return f"{share:g}%"
    return fail(f'a positive integer (at most {MAX_WORKERS}) or a percentage like "50%"', v)


def share_of(batch: int | str, total: int) -> int:
    """How many of `total` a reload_batch means (at least 1)."""
    if isinstance(batch, str):
        return max(1, math.ceil(total * float(batch[:-1]) / 100))
    return batch


SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH")


def stop_signal(v: Any) -> signal.Signals:
    """A signal name (SIGTERM, TERM) or number; kept as a Signals member."""
    if _is_int(v):
        try:
            sig = signal.Signals(v)
        except ValueError:
            sig = None
        if sig is not None and sig.name in SIGNALS:
            return sig
        return fail("one of " + ", ".join(SIGNALS), v)
    name = v.strip().upper() if isinstance(v, str) else v
    if isinstance(name, str) and not name.startswith("SIG"):
        name = "SIG" + name
    if name not in SIGNALS:
        return fail("one of " + ", ".join(SIGNALS), v)
    return signal.Signals[name]


def listen(v: Any) -> str:
    s = string(v).strip()
    if s.startswith("unix:") and len(s) > 5:
        return s
    _, sep, port = s.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return fail("HOST:PORT (like 127.0.0.1:8000, port 1-65535) or unix:PATH", v)
    return s


class Readiness(NamedTuple):
    """How a worker tells it is ready: notify (sd_notify), pipe, or a delay."""

    mode: str = "notify"
    delay: float = 0.0

    def __str__(self) -> str:
        return f"delay:{self.delay:g}" if self.mode == "delay" else self.mode


READY_MODES = "notify, pipe or delay:SECONDS"


def ready(v: Any) -> Readiness:
    if isinstance(v, Readiness):
        return v
    s = v.strip() if isinstance(v, str) else ""
    if s in ("notify", "pipe"):
        return Readiness(s)
    if s.startswith("delay:"):
        try:
            delay = seconds(0.0, inclusive=True)(float(s[6:]))
        except (ValueError, Invalid):
            delay = None
        if delay is not None:
            return Readiness("delay", delay)
    return fail(f"one of {READY_MODES}", v)


def env(v: Any) -> dict[str, str]:
    """A table of NAME = "value" (numbers become strings)."""
    if (
        isinstance(v, dict)
        and all(isinstance(k, str) and workerenv.is_name(k) for k in v)
        and all(
            isinstance(x, (str, int, float)) and not isinstance(x, bool) and "\0" not in str(x)
            for x in v.values()
        )
    ):
        return {k: str(x) for k, x in v.items()}
    return fail('a table of NAME = "value"', v)


def path(v: Any) -> str:
    return string(v)


_URL_PASSWORD = re.compile(r"(?<=://)([^/@:\s]*):[^@\s]*@")


def mask_url(text: str) -> str:
    """A URL (or a message holding one) with its password shown as ***."""
    return _URL_PASSWORD.sub(r"\1:***@", text)
