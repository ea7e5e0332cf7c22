"""Looking at a running release: health probes (a wall-clock deadline), status, the watch."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

from deployer.agent.ops.common import AgentError
from deployer.agent.ops.lock import _read_owner
from deployer.agent.ops.release import state
from deployer.agent.ops.units import boot_status
from deployer.hostapi import answers
from deployer.hostapi.layout import Layout


class _Deadline(Exception):
    """The wall-clock deadline of an operation passed (SIGALRM)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise _Deadline in the middle of whatever blocks when `seconds` have passed: a
    server trickling one byte a second never times out a socket read."""

    def expire(signum: int, frame: object) -> None:
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def health(
    url: str, expect: int, timeout: float, passes: int, interval: float
) -> answers.HealthResult:
    """Probe until `passes` answers in a row have status `expect`, within `timeout`
    of wall-clock time, whatever the server does."""
    end = time.monotonic() + timeout
    streak, probes, last = 0, 0, "no answer yet"
    try:
        with deadline(timeout):
            while True:
                probes += 1
                status, last = _probe(url, min(5.0, max(0.5, end - time.monotonic())))
                streak = streak + 1 if status == expect else 0
                if streak >= passes:
                    return answers.HealthResult(url, probes, status)
                if time.monotonic() + interval > end:
                    break
                time.sleep(interval)
    except _Deadline:
        last += f" (the deadline passed during probe {probes})"
    raise AgentError(
        f"health check {url} failed: wanted {passes} x {expect} in a row within "
        f"{timeout:g}s; {probes} probes, last answer: {last}"
    )


def _probe(url: str, timeout: float) -> tuple[int | None, str]:
    import http.client  # here, not at the top: ~30 ms that only health needs
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, f"{resp.status}"
    except urllib.error.HTTPError as e:
        return e.code, f"{e.code} {e.reason}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None, f"no answer ({reason})"
    except http.client.HTTPException as e:
        # the app answered, but not in HTTP: its fault, a failing probe like a 500
        return None, _not_http(e)


def _not_http(e: Exception) -> str:
    line = getattr(e, "line", None)  # BadStatusLine: the first line the app wrote
    said = repr(line.strip()[:80]) if isinstance(line, str) else f"{type(e).__name__}: {e}"
    return f"not an HTTP answer: {said}"


def status(
    layout: Layout,
    socket: str | None,
    url: str | None,
    expect: int,
    timeout: float,
    window: float,
) -> answers.HostStatus:
    """Everything `deployer status` shows of a host, within `timeout` in all."""
    begun = time.monotonic()
    host = state(layout)
    master, why = None, None
    if socket and host.master.running:
        try:
            with deadline(max(0.5, timeout / 2)):
                master = _master_summary(socket, window)
        except (AgentError, _Deadline) as e:
            why = str(e) or f"no answer on {socket}"
    health = None
    if url and host.current:
        left = max(0.5, timeout - (time.monotonic() - begun) - 0.5)
        try:
            with deadline(left):
                code, last = _probe(url, left)
            health = "ok" if code == expect else f"{url}: wanted {expect}, got {last}"
        except _Deadline:
            health = f"{url}: no complete answer within {left:.1f}s"
    owner = _read_owner(layout.lock / "owner.json")
    return answers.HostStatus(host, master, why, owner, health, boot_status(layout))


def _master_summary(socket: str, window: float) -> answers.MasterSummary:
    s = _master_status(socket)
    since = time.time() - window
    crashes = [c for c in s.get("recent_crashes", []) if c.get("at", 0) >= since]
    last = crashes[-1] if crashes else None
    release = s.get("release")
    return answers.MasterSummary(
        pid=s.get("pid", 0),
        state=s.get("state", "?"),
        release=os.path.basename(release) if release else None,
        ready=s.get("ready", 0),
        configured=s.get("configured", 0),
        recent_crashes=len(crashes),
        last_crash=None if last is None else f"{last.get('when')} ({last.get('how')})",
        crash_loops=len(s.get("crash_loops", [])),
    )


def _master_status(socket: str) -> dict[str, Any]:
    from deployer.master.control import ControlError, request  # only these ops need it

    try:
        answer = list(request(socket, {"cmd": "status"}, 10.0))[-1]
    except (ControlError, TimeoutError, OSError, IndexError) as e:
        raise AgentError(f"the master does not answer on {socket}: {e}") from None
    return answer.get("status") or {}


WATCH_POLL = 0.25  # a status read and a probe a poll: cheap, and a crash is seen sooner


def watch(
    seconds: float, sockets: list[str], urls: list[tuple[str, int]], window: float = 0.0
) -> answers.WatchResult:
    """Fail at the first sign that the release does not hold up after its switch:
    a worker crash a master reports (a crash loop that starts after ready), a
    worker not ready, a health probe that does not answer its expected status.
    Every master (`sockets`: one per role) and health URL of the host at once.
    A crash in the `window` seconds before the watch counts too: the controller
    gives the time since the host's switch began (measured on its own clock, so the
    two clocks need not agree), and `seconds` = 0 is one look at all of it."""
    started, begun = time.time() - max(0.0, window), time.monotonic()
    polls = probes = 0
    while True:
        for socket in sockets:
            _check_master(socket, started)
            polls += 1
        for url, expect in urls:
            try:
                with deadline(5.0):  # a probe that hangs is a failing probe
                    status, last = _probe(url, 5.0)
            except _Deadline:
                status, last = None, "no complete answer within 5s"
            probes += 1
            if status != expect:
                raise AgentError(
                    f"health check {url} failed {time.monotonic() - begun:.1f}s into the "
                    f"watch: wanted {expect}, got {last}"
                )
        left = seconds - (time.monotonic() - begun)
        if left <= 0:
            return answers.WatchResult(seconds, polls, probes)
        time.sleep(min(WATCH_POLL, left))


def _check_master(socket: str, since: float) -> None:
    status = _master_status(socket)
    crashes = [c for c in status.get("recent_crashes", []) if c.get("at", 0) >= since]
    if crashes:
        c = crashes[0]
        raise AgentError(
            f"worker {c.get('worker')} (pid {c.get('pid')}) crashed {c['at'] - since:.1f}s "
            f"into the watch ({c.get('how')}); {len(crashes)} crash(es) in all"
        )
    if status.get("ready", 0) < status.get("configured", 0):
        raise AgentError(
            f"{status.get('ready')} of {status.get('configured')} workers ready "
            f"(master state {status.get('state')})"
        )


WORKER_LABEL = re.compile(r"\[worker \d+ pid (\d+)\] ")  # master/log.py: a worker's line
LOG_SCAN = 2000  # lines of the log looked through for the workers' last ones


def workers(layout: Layout, socket: str, release: str, lines: int) -> answers.WorkerReport:
    """What the master on `socket` saw of `release`'s workers: its crash log and
    workers, and the last `lines` lines those wrote to its log (by their pids)."""
    status = _master_status(socket)

    def ours(entry: dict[str, Any]) -> bool:
        return os.path.basename(str(entry.get("release") or "")) == release

    crashes = [c for c in status.get("recent_crashes", []) if ours(c)]
    live = [w for w in status.get("workers", []) if ours(w)]
    pids = {str(x.get("pid")) for x in crashes + live}
    last = crashes[-1] if crashes else None
    return answers.WorkerReport(
        release=release,
        listen=status.get("listen"),
        ready=sum(1 for w in live if w.get("state") == "ready"),
        configured=status.get("configured", 0),
        crashes=len(crashes),
        last_crash=None if last is None else f"{last.get('how')} at {last.get('when')}",
        lines=_lines_of(layout.master_log, pids, lines),
    )


def _lines_of(log: Any, pids: set[str], count: int) -> list[str]:
    """The last `count` lines of `log` written by the workers with these pids, without
    the log's timestamp."""
    from deployer.agent.ops.day2 import _backlog, _open_log

    f = _open_log(log)
    if f is None or not pids:
        return []
    with f:
        recent = _backlog(f, os.fstat(f.fileno()).st_size, LOG_SCAN, None)
    found = []
    for raw in recent:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        m = WORKER_LABEL.search(line)
        if m is not None and m.group(1) in pids:
            found.append(line[m.start() :])
    return found[-count:]
