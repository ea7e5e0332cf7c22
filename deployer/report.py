"""Progress of a fleet command: timestamped lines, or a live table on a terminal."""

from __future__ import annotations

import datetime as dt
import os
import sys
import threading
import time
from typing import Any, TextIO


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
            for line in text.splitlines() or [""]:
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
        with self._lock:
            if host is not None:
                self.rows[host] = (text.splitlines()[0][:100] if text else "", time.monotonic())
            stamp = dt.datetime.now().strftime("%H:%M:%S")
            self.live.console.print(f"{stamp} {host or '':<12} {text}", markup=False)
            self.live.update(self._table())

    def close(self) -> None:
        self.live.stop()


def reporter_for(stream: TextIO | None = None) -> Reporter:
    """Live view on a terminal; plain timestamped lines anywhere else (hooks, CI)."""
    stream = stream or sys.stdout
    if stream.isatty() and os.environ.get("TERM") != "dumb":
        return LiveReporter()
    return Reporter(stream)
