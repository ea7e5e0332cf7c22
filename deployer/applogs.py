"""`deployer app logs`: the app's logs from every host, merged by time; `-f` follows
them (agent call `logs`, one stream a host)."""

from __future__ import annotations

import datetime as dt
import heapq
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from deployer.errors import BadInput, DeployerError
from deployer.hostapi import answers, calls
from deployer.remote import RemoteHost
from deployer.report import Prefixer, short_error
from deployer.session import FleetSession

STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z) ")  # master/log.py timestamp()
_RELATIVE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)\s*")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
HOLD = 0.3  # follow: seconds a line waits for lines of other hosts that were written before it
BACKLOG_WAIT = 20.0  # follow: seconds the backlogs of slow hosts are waited for, merged
STOP_WAIT = 5.0  # seconds the streams get to end after Ctrl-C


def log_stamp(when: dt.datetime) -> str:
    """A time as master.log stamps lines: `2026-12-01T11:01:55.333Z` (UTC)."""
    utc = when.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


_SINCE_FORMS = (
    "expected a time like 2026-12-01T11:00:00 (local time, or with Z or +01:00) in the "
    "years 1 to 9999, or a duration ago like 30s, 10m, 1h, 2d"
)


def parse_since(text: str, now: dt.datetime | None = None) -> str:
    """`--since`: `10m`, `1h`, `2d`, `30s` ago, or an ISO time (`2026-12-01T11:00`,
    `2026-12-01 11:00:00Z`, `2026-12-01`; without a zone: this machine's local
    time). Returned as the log's own stamp, which the host compares as text."""
    try:
        return log_stamp(_since_time(text, now or dt.datetime.now(dt.UTC)))
    except (ValueError, OverflowError):
        # OverflowError: a duration or a zone that goes past year 1 or 9999
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise BadInput(f"--since {shown!r}: {_SINCE_FORMS}") from None


def _since_time(text: str, now: dt.datetime) -> dt.datetime:
    m = _RELATIVE.fullmatch(text)
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    when = dt.datetime.fromisoformat(text.strip())
    return when if when.tzinfo else when.astimezone()


def _until(stop: threading.Event) -> Iterator[bytes]:
    """A follow's stdin: nothing, and its end once `stop` is set (the agent stops)."""
    stop.wait()
    yield from ()


class _Merge:
    """Lines of several hosts, each host's kept in its order, merged by their stamps;
    an unstamped line (a traceback) goes with the stamped line before it."""

    def __init__(self, names: Sequence[str]) -> None:
        self.order = {n: i for i, n in enumerate(names)}
        self.last: dict[str, str] = dict.fromkeys(names, "")
        self.seq = 0

    def key(self, name: str, text: str) -> tuple[str, int, int]:
        m = STAMP.match(text)
        if m:
            self.last[name] = m.group(1)
        self.seq += 1
        return (self.last[name], self.order[name], self.seq)


def logs(
    session: FleetSession,
    lines: int | None,
    since: str | None,
    follow: bool,
    out: TextIO,
    err: TextIO,
    until_idle: float | None = None,
) -> int:
    """`deployer app logs`: 0, or 1 if a host's log could not be read. One stream per
    master: `web1` for a host's only master, `web1/worker` for a role's."""
    streams = {
        (n if role.name is None else f"{n}/{role.name}"): (remote, role.name)
        for n, remote in session.remotes.items()
        for role in (remote.config.masters or remote.config.roles[:1])
    }
    names = list(streams)
    show = Prefixer(names, out)
    merge = _Merge(names)
    events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
    stop = threading.Event()

    def stream(name: str, remote: RemoteHost, role: str | None) -> None:
        def on_line(text: str) -> None:
            if text.startswith(calls.LOG_LINE):
                events.put(("line", name, text[len(calls.LOG_LINE) :]))
            elif text == calls.LOG_LIVE:
                events.put(("live", name, None))

        call = calls.logs(lines, since, follow, role=role)
        try:
            stdin = _until(stop) if follow else None
            answer: answers.LogsResult = remote.call(call, stdin=stdin, on_line=on_line)
            events.put(("end", name, answer))
        except DeployerError as e:
            events.put(("fail", name, short_error(e, remote.name)))
        except Exception as e:  # a bug: said per host, never a hung command
            events.put(("fail", name, f"{type(e).__name__}: {e}"))

    for name, (remote, role) in streams.items():
        threading.Thread(target=stream, args=(name, remote, role), daemon=True).start()
    call = calls.logs(lines, since, follow)  # its deadline

    failed: dict[str, str] = {}
    ended: set[str] = set()

    def write(batch: list[tuple[tuple[str, int, int], str, str]]) -> None:
        for _key, name, text in batch:
            out.write(show(name, text) + "\n")
        out.flush()

    def settle(kind: str, name: str, value: Any) -> None:
        ended.add(name)
        if kind == "fail":
            failed[name] = value
            err.write(show(name, f"FAILED: {value}") + "\n")
        elif not value.exists and not follow:
            err.write(show(name, f"no log yet at {value.path} (no master has run here)") + "\n")
        err.flush()

    # The backlogs, merged: every host's, or what came of them in BACKLOG_WAIT.
    per_host: dict[str, list[tuple[tuple[str, int, int], str, str]]] = {n: [] for n in names}
    live: set[str] = set()
    end = time.monotonic() + (BACKLOG_WAIT if follow else call.deadline + 30)
    try:
        while len(live | ended) < len(names) and time.monotonic() < end:
            try:
                kind, name, value = events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "line":
                per_host[name].append((merge.key(name, value), name, value))
            elif kind == "live":
                live.add(name)
            else:
                settle(kind, name, value)
        write(list(heapq.merge(*(_backfilled(lines) for lines in per_host.values()))))
        if not follow:
            for name in names:
                if name not in ended:
                    failed[name] = "no answer in time"
                    err.write(show(name, "FAILED: no answer in time") + "\n")
            return 1 if failed else 0
        _live(events, merge, write, settle, ended, names, until_idle)
    except KeyboardInterrupt:
        pass
    stop.set()
    # the streams end as their stdin closes; what they still had is shown
    pending: list[tuple[tuple[str, int, int], str, str]] = []
    end = time.monotonic() + STOP_WAIT
    while len(ended) < len(names) and time.monotonic() < end:
        try:
            kind, name, value = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if kind == "line":
            pending.append((merge.key(name, value), name, value))
        elif kind in ("end", "fail"):
            settle(kind, name, value)
    write(sorted(pending))
    return 1 if failed else 0


def _backfilled(
    lines: list[tuple[tuple[str, int, int], str, str]],
) -> list[tuple[tuple[str, int, int], str, str]]:
    """A host's backlog whose first lines have no stamp (a traceback cut by -n): they
    go with the first stamped line after them."""
    first = next((key[0] for key, _, _ in lines if key[0]), "")
    return [((key[0] or first, *key[1:]), name, text) for key, name, text in lines]


def _live(
    events: queue.Queue[tuple[str, str, Any]],
    merge: _Merge,
    write: Any,
    settle: Any,
    ended: set[str],
    names: Sequence[str],
    until_idle: float | None,
) -> None:
    """Follow: lines as they come, each held HOLD seconds so that lines other hosts
    wrote before it (and sent a little later) come out first."""
    held: list[tuple[float, tuple[str, int, int], str, str]] = []
    last_line = time.monotonic()
    while len(ended) < len(names):
        try:
            kind, name, value = events.get(timeout=0.05)
            if kind == "line":
                last_line = time.monotonic()
                held.append((last_line, merge.key(name, value), name, value))
            elif kind in ("end", "fail"):
                settle(kind, name, value)
        except queue.Empty:
            pass
        now = time.monotonic()
        ripe = [h for h in held if h[0] <= now - HOLD]
        if ripe:
            held = [h for h in held if h[0] > now - HOLD]
            write(sorted((k, n, t) for _, k, n, t in ripe))
        if until_idle is not None and not held and now - last_line > until_idle:
            return
    write(sorted((k, n, t) for _, k, n, t in held))
