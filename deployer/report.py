"""Progress of a fleet command: timestamped lines, or a live table on a terminal."""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

# Output from the repository or its build reaches terminals (ours, the pusher's):
# an escape sequence there can retitle the window, hide lines or fake a result.
# Every C0 control but tab and newline, DEL and every C1 control shows as `\xNN`.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0)]
_VISIBLE = str.maketrans({c: f"\\x{c:02x}" for c in _CONTROLS if chr(c) not in "\t\n"})


def printable(text: str) -> str:
    """`text` with control characters as visible escapes; newlines and tabs kept."""
    return text.translate(_VISIBLE)


def safe_lines(text: str) -> list[str]:
    """`text` as printable lines: split at newlines only (a CR-LF ending is one), so
    a lone CR or form feed shows instead of moving the cursor."""
    body = text[:-1] if text.endswith("\n") else text
    return [printable(line.removesuffix("\r")) for line in body.split("\n")]


class Reporter:
    """Plain timestamped lines: safe in a git hook, CI or a log file."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def close(self) -> None:
        pass

    def say(self, text: str, host: str | None = None) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        prefix = f"{stamp} {host:<12} " if host else f"{stamp} "
        with self._lock:
            for line in safe_lines(text):
                self.stream.write(prefix + line + "\n")
            self.stream.flush()


class LiveReporter(Reporter):
    """On a terminal: a live table of hosts (last step, elapsed), log lines above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        super().__init__()
        self.console = Console()
        self.started = time.monotonic()
        self.rows: dict[str, tuple[str, float]] = {}
        self.live = Live(self._table(), console=self.console, refresh_per_second=4)
        self.live.start()

    def _table(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, show_header=True, header_style="bold")
        for column in ("host", "step", "since"):
            table.add_column(column)
        now = time.monotonic()
        for host, (text, since) in self.rows.items():
            style = "red" if "FAIL" in text else "green" if "healthy" in text else ""
            table.add_row(host, Text(text, style=style), f"{now - since:.1f}s")
        return table

    def say(self, text: str, host: str | None = None) -> None:
        lines = safe_lines(text)
        with self._lock:
            if host is not None:
                self.rows[host] = (lines[0][:100], time.monotonic())
            stamp = dt.datetime.now().strftime("%H:%M:%S")
            shown = "\n".join(lines)
            self.live.console.print(f"{stamp} {host or '':<12} {shown}", markup=False)
            self.live.update(self._table())

    def close(self) -> None:
        self.live.stop()


class TeeReporter(Reporter):
    """What another reporter shows, also written to a log (plain lines)."""

    def __init__(self, shown: Reporter, log: TextIO) -> None:
        super().__init__(log)
        self.shown = shown

    def say(self, text: str, host: str | None = None) -> None:
        self.shown.say(text, host)
        super().say(text, host)

    def close(self) -> None:
        self.shown.close()
        self.stream.close()


def reporter_for(stream: TextIO | None = None) -> Reporter:
    """Live view on a terminal; plain timestamped lines anywhere else (hooks, CI)."""
    stream = stream or sys.stdout
    if stream.isatty() and os.environ.get("TERM") != "dumb":
        return LiveReporter()
    return Reporter(stream)


# --- lines of many hosts (app logs, exec, doctor) ---

_COLORS = ("36", "33", "32", "35", "34", "91", "96", "93", "92", "95")


class Prefixer:
    """`web1: ` before each line of a host; colored per host on a terminal."""

    def __init__(self, names: Sequence[str], stream: TextIO) -> None:
        tty = stream.isatty() and os.environ.get("TERM") != "dumb"
        color = tty and "NO_COLOR" not in os.environ
        self.prefix = {
            name: (f"\x1b[{_COLORS[i % len(_COLORS)]}m{name}\x1b[0m: " if color else f"{name}: ")
            for i, name in enumerate(names)
        }

    def __call__(self, name: str, text: str) -> str:
        return self.prefix.get(name, f"{name}: ") + printable(text)


def short_error(e: BaseException, name: str) -> str:
    """A host's failure without the host's name in front (its line already says it)."""
    return str(e).removeprefix(f"{name}: ")
