#!/usr/bin/env python3
"""Reloads under load: `deployer master` with 2 workers of each example app,
`wrk -t2 -c1000 -d30s --latency` against it while the master is reloaded
every 2 s, next to the same run without reloads.

    python bench/reload_under_load.py [--apps python,node] [--connections 1000]
        [--duration 30] [--interval 2] [--write-results]

Reports, per app: total requests, non-2xx, socket errors (connect/read/write/
timeout), rps and p99, for both runs; the reloads that finished (only those
count), the time from `reload` to the last old worker stopped, the master's
RSS, and the time from a worker's SIGKILL to a ready replacement.
Targets (issue 6): 0 non-2xx and 0 connect/read/write errors with reloads,
timeouts no more than without, rps >= 90 % and p99 <= 2x the no-reload run.

Loopback only; every process started here is stopped by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployer.master.control import ControlError, request  # noqa: E402

APPS = {
    "python": (REPO / "examples/python-app/app.py", [sys.executable, "app.py"], "notify"),
    "node": (REPO / "examples/node-app/app.js", ["node", "app.js"], "pipe"),
}
RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN, END = "<!-- master-bench:begin -->", "<!-- master-bench:end -->"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # wrk and the workers inherit it
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- wrk ---


@dataclass
class Wrk:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p99_ms: float = 0.0
    non2xx: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    raw: str = ""

    @property
    def failed(self) -> int:
        """Failures that a reload could cause (timeouts are compared separately)."""
        return self.non2xx + self.connect + self.read + self.write


def to_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(text: str) -> Wrk:
    w = Wrk(raw=text)
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", text):
        w.requests = int(m[1])
        w.seconds = to_ms(m[2], m[3]) / 1000
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        w.rps = float(m[1])
    if m := re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        w.p99_ms = to_ms(m[1], m[2])
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        w.non2xx = int(m[1])
    if m := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        w.connect, w.read, w.write, w.timeout = map(int, m.groups())
    return w


def run_wrk(port: int, connections: int, duration: int, threads: int = 2) -> subprocess.Popen:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
            f"http://127.0.0.1:{port}/"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# --- the master under test ---


@dataclass
class MasterUnderTest:
    app: str
    workdir: Path
    workers: int = 2
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    generation: int = 0

    @property
    def socket(self) -> str:
        return str(self.workdir / "master.sock")

    @property
    def log(self) -> Path:
        return self.workdir / "master.log"

    def release(self, name: str) -> Path:
        path = self.workdir / "releases" / name
        path.mkdir(parents=True, exist_ok=True)
        source = APPS[self.app][0]
        with contextlib.suppress(FileExistsError):
            (path / source.name).symlink_to(source)
        return path

    def switch(self, name: str) -> None:
        tmp = self.workdir / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.release(name))
        tmp.rename(self.workdir / "current")

    def start(self) -> None:
        self.switch("r0")
        _, command, ready = APPS[self.app]
        argv = [sys.executable, "-m", "deployer.master", "run", "--workers", str(self.workers),
                "--listen", f"127.0.0.1:{self.port}", "--cwd", str(self.workdir / "current"),
                "--socket", self.socket, "--log", str(self.log), "--ready", ready,
                "--shutdown-timeout", "30", "--", *command]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, KeyError, ControlError):
                s = self.status()
                if s["ready"] == self.workers and s["state"] == "running":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"master did not get ready; see {self.log}")

    def status(self) -> dict:
        return list(request(self.socket, {"cmd": "status"}, 10))[-1]["status"]

    def reload(self) -> tuple[bool, float, str]:
        """Switch `current` to the other release and reload; (ok, seconds, error)."""
        self.generation += 1
        self.switch(f"r{self.generation % 2}")
        started = time.monotonic()
        answers = list(request(self.socket, {"cmd": "reload"}, 120))
        final = answers[-1] if answers else {}
        return bool(final.get("ok")), time.monotonic() - started, final.get("error", "")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def crash_restart_seconds(self, slot: int) -> float:
        """SIGKILL the worker of a slot; time until the slot has a ready replacement."""
        victim = next(w for w in self.status()["workers"] if w["id"] == slot)
        started = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        while time.monotonic() - started < 30:
            workers = self.status()["workers"]
            if any(w["id"] == victim["id"] and w["pid"] != victim["pid"] and w["state"] == "ready"
                   for w in workers):  # fmt: skip
                return time.monotonic() - started
            time.sleep(0.005)
        raise RuntimeError("no replacement within 30 s")

    def boot_seconds(self) -> list[float]:
        return [float(x) for x in re.findall(r"ready after ([\d.]+)s", self.log.read_text())]


# --- scenarios ---


@dataclass
class Run:
    wrk: Wrk
    reloads: list[tuple[bool, float, str]] = field(default_factory=list)
    rss_max: int = 0
    master_cpu: float = 0.0  # seconds of CPU the master used during the run
    workers_cpu: float = 0.0  # seconds of CPU all workers used during the run
    load_avg: float = 0.0  # 1-minute load average at the end (other sessions share the box)


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of pid (plus its reaped children's with children=True)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def workers_cpu(m: MasterUnderTest) -> float:
    """CPU of every worker so far: reaped ones (the master's cutime) plus live ones."""
    assert m.proc is not None
    total = cpu_seconds(m.proc.pid, children=True) - cpu_seconds(m.proc.pid)
    for w in m.status()["workers"]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(w["pid"])
    return total


def load_run(m: MasterUnderTest, args: argparse.Namespace, reloading: bool) -> Run:
    assert m.proc is not None
    cpu_before = cpu_seconds(m.proc.pid)
    workers_before = workers_cpu(m)
    wrk = run_wrk(m.port, args.connections, args.duration)
    run = Run(Wrk())
    started = time.monotonic()
    if reloading:
        next_at = started + args.interval
        # Stop issuing reloads early enough that the last one ends inside the run.
        while time.monotonic() < started + args.duration - args.interval - 1:
            time.sleep(max(0.0, next_at - time.monotonic()))
            run.reloads.append(m.reload())
            run.rss_max = max(run.rss_max, m.status()["rss"] or 0)
            next_at = max(next_at + args.interval, time.monotonic())
    out, _ = wrk.communicate(timeout=args.duration + 60)
    run.wrk = parse_wrk(out)
    run.rss_max = max(run.rss_max, m.status()["rss"] or 0)
    run.master_cpu = cpu_seconds(m.proc.pid) - cpu_before
    run.workers_cpu = workers_cpu(m) - workers_before
    run.load_avg = os.getloadavg()[0]
    return run


def bench_app(app: str, args: argparse.Namespace) -> dict:
    rows: dict = {"app": app}
    for reloading in (False, True):
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-master-{app}-"))
        m = MasterUnderTest(app, workdir)
        try:
            m.start()
            time.sleep(0.5)
            run = load_run(m, args, reloading)
            rows["reload" if reloading else "baseline"] = run
            # One kill per slot: a second kill of the same slot within STABLE_AFTER
            # would (rightly) count as a crash loop and back off.
            rows.setdefault("crash_restart", []).extend(
                m.crash_restart_seconds(slot) for slot in range(1, m.workers + 1)
            )
            rows.setdefault("boot", []).extend(m.boot_seconds())
        finally:
            m.stop()
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        print(f"{app} {'reload' if reloading else 'baseline'}: {summary(run)}", flush=True)
    return rows


def reload_stats(run: Run) -> tuple[str, str]:
    done = [s for ok, s, _ in run.reloads if ok]
    if not run.reloads:
        return "-", "-"
    spread = f"{statistics.median(done):.2f} / {max(done):.2f}" if done else "-"
    return f"{len(done)}/{len(run.reloads)}", spread


def summary(run: Run) -> str:
    w = run.wrk
    per_cpu = w.requests / max(run.workers_cpu, 0.01)
    text = (
        f"{w.requests} requests, {w.rps:.0f} rps, p99 {w.p99_ms:.1f} ms, non-2xx {w.non2xx},"
        f" errors connect {w.connect} read {w.read} write {w.write} timeout {w.timeout},"
        f" master cpu {run.master_cpu:.2f}s, workers cpu {run.workers_cpu:.1f}s"
        f" ({per_cpu:.0f} requests per worker cpu-second), load {run.load_avg:.1f}"
    )
    if run.reloads:
        ok, spread = reload_stats(run)
        text += f"; reloads {ok} ok, median / max {spread} s"
    return text


# --- report ---


def verdict(rows: dict) -> list[str]:
    base, rel = rows["baseline"].wrk, rows["reload"].wrk
    reloads = rows["reload"].reloads
    done = [s for ok, s, _ in reloads if ok]
    rss = rows["reload"].rss_max
    p99_ratio = rel.p99_ms / max(base.p99_ms, 0.001)
    checks = [
        (rel.failed == 0, f"failed requests with reloads: {rel.failed} (target 0)"),
        (
            rel.timeout <= base.timeout,
            f"timeouts {rel.timeout} with reloads vs {base.timeout} without (target: no more)",
        ),
        (rel.rps >= 0.9 * base.rps, f"rps {rel.rps / base.rps:.0%} of the no-reload run (>= 90%)"),
        (
            p99_ratio <= 2,
            f"p99 {rel.p99_ms:.1f} ms vs {base.p99_ms:.1f} ms ({p99_ratio:.2f}x, <= 2x)",
        ),
        (len(done) == len(reloads), f"reloads finished ok: {len(done)} of {len(reloads)}"),
        (rss <= 30e6, f"master RSS max {rss / 1e6:.1f} MB (<= 30)"),
    ]
    return [f"{'met' if ok else '**missed**'}: {text}" for ok, text in checks]


HEADER = (
    "| app | run | requests | rps | p99 ms | non-2xx | connect | read | write | timeout"
    " | reloads ok | reload s (median / max) | requests per worker cpu-s | load avg |"
)


def table_row(app: str, kind: str, run: Run, interval: float) -> str:
    w = run.wrk
    ok, spread = reload_stats(run)
    label = f"reload every {interval:g} s" if kind == "reload" else "no reloads"
    cells = [
        app, label, f"{w.requests:,}", f"{w.rps:,.0f}", f"{w.p99_ms:.1f}", w.non2xx, w.connect,
        w.read, w.write, w.timeout, ok, spread, f"{w.requests / max(run.workers_cpu, 0.01):,.0f}",
        f"{run.load_avg:.1f}",
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(all_rows: list[dict], args: argparse.Namespace) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        BEGIN,
        "## Cluster master: reloads under load",
        "",
        f"`python bench/reload_under_load.py --connections {args.connections}"
        f" --duration {args.duration} --interval {args.interval:g}` ({when}):"
        f" wrk -t2 -c{args.connections} -d{args.duration}s --latency, 2 workers, a reload"
        f" every {args.interval:g} s (each switches `current` to the other release and"
        " replaces every worker one by one, ready_soak 1 s), against the same run without"
        f" reloads. {os.cpu_count()} cores shared with wrk and with other sessions' work"
        " (load average column): compare rows of the same run, not across runs.",
        "",
        HEADER,
        "|" + "---|" * 2 + "---:|" * 12,
    ]
    for rows in all_rows:
        for kind in ("baseline", "reload"):
            lines.append(table_row(rows["app"], kind, rows[kind], args.interval))
    lines.append("")
    for rows in all_rows:
        crash, boot = rows["crash_restart"], rows["boot"]
        lines.append(f"**{rows['app']}**: " + "; ".join(verdict(rows)) + ".")
        lines.append(
            f"Worker SIGKILL to ready replacement: median {statistics.median(crash):.2f} s"
            f" (max {max(crash):.2f}), including the app's boot (spawn to READY under load:"
            f" median {statistics.median(boot):.2f} s)."
        )
        failures = [e for ok, _, e in rows["reload"].reloads if not ok]
        if failures:
            lines.append(f"Failed reloads: {failures[:3]}")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", default="python,node")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep work dirs (logs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    raise_fd_limit()
    all_rows = [bench_app(app, args) for app in args.apps.split(",")]
    section = markdown(all_rows, args)
    print(section)
    if args.json:
        print(json.dumps([{k: (v.__dict__ if isinstance(v, Run) else v) for k, v in r.items()}
                          for r in all_rows], default=lambda o: o.__dict__, indent=1))  # fmt: skip
    if args.write_results:
        write_results(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
