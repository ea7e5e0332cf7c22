#!/usr/bin/env python3
"""Reloads under load: `deployer master` with 2 workers of each example app,
`wrk -t2 -c1000 -d30s --latency` against it while the master is reloaded
every 2 s, next to the same run without reloads; and the anchors (what
operators use today) with the same harness, handler and load.

    python bench/reload_under_load.py [--targets master-python,master-node,...]
        [--connections 1000] [--duration 30] [--interval 2] [--out FILE]
        [--node-warmup 2000] [--reload-batch 1] [--pm2 PATH] [--gunicorn PATH]

Targets: master-python, master-node (the examples under `deployer master`);
anchors (bench/anchors/): node-sighup and node-usr2 (the Node cluster SIGHUP
and one-by-one SIGUSR2 recipes), pm2 (cluster mode, 2 instances, `pm2
reload`), gunicorn (2 workers, `kill -HUP`). pm2 and gunicorn are third-party
and never vendored: install them in a scratch dir and pass their paths.

Reports, per target: total requests, non-2xx, socket errors (connect/read/
write/timeout), rps and p99, for both runs; the reloads that finished (only
those count: a reload is waited for until it finishes or the run ends), the
time from the reload request to the last old worker stopped, and for the
master its RSS and the time from a worker's SIGKILL to a ready replacement.
Targets (issue 6): 0 non-2xx and 0 connect/read/write errors with reloads,
timeouts no more than without, rps >= 90 % and p99 <= 2x the no-reload run.

Loopback only; every process started here is stopped by pid (pm2's daemon by
`pm2 kill` on its own PM2_HOME).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployer.master.control import ControlError, request  # noqa: E402

# app -> (source, command, master options): what the README recommends for each.
APPS = {
    "python": (
        REPO / "examples/python-app/app.py",
        [sys.executable, "app.py"],
        ["--ready", "notify"],
    ),
    "node": (
        REPO / "examples/node-app/app.js",
        ["node", "app.js"],
        ["--ready", "pipe", "--listen-fds", "64"],
    ),
}
ANCHORS = REPO / "bench" / "anchors"
READY_SOAK = 1.0  # the master's default, used here
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


# --- processes ---


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of pid (plus its reaped children's with children=True)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def kernel_counter(path: str, group: str, name: str) -> int:
    """A system-wide counter of /proc/net/netstat or /proc/net/snmp."""
    with open(path) as f:
        rows = [line.split() for line in f if line.startswith(group + ":")]
    return int(dict(zip(rows[0], rows[1], strict=True))[name])


def listen_overflows() -> int:
    """TcpExt ListenOverflows: SYNs dropped on a full accept queue."""
    return kernel_counter("/proc/net/netstat", "TcpExt", "ListenOverflows")


def accepted() -> int:
    """Tcp PassiveOpens: connections accepted (wrk's reconnects show here)."""
    return kernel_counter("/proc/net/snmp", "Tcp", "PassiveOpens")


def http_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class Target:
    """Something serving on `port` with a master process that can be reloaded."""

    name = ""
    baseline = ""  # runs with the same baseline key share one no-reload run
    workers = 2

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def reload(self, deadline: float) -> tuple[bool, float, str]:
        """One reload, waited for until it finished or `deadline`: (ok, seconds, error)."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        return children(self.pid)

    def rss(self) -> int:
        return rss_of(self.pid)

    def workers_cpu(self) -> float:
        """CPU of every worker so far: reaped ones (the master's cutime) plus live ones."""
        total = cpu_seconds(self.pid, children=True) - cpu_seconds(self.pid)
        return total + sum(cpu_seconds(p) for p in self.worker_pids())

    def wait_serving(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.worker_pids()) >= self.workers and http_ok(self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start serving on {self.port}")


# --- the master under test ---


class MasterUnderTest(Target):
    def __init__(
        self, app: str, workdir: Path, release_env: dict[str, str], reload_batch: int = 1
    ) -> None:
        super().__init__(workdir)
        self.app = app
        self.release_env = release_env  # the app's switches, as release.env
        self.reload_batch = reload_batch
        self.name = self.baseline = f"master-{app}"
        self.proc: subprocess.Popen | None = None
        self.generation = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def socket(self) -> str:
        return str(self.workdir / "master.sock")

    @property
    def log(self) -> Path:
        return self.workdir / "master.log"

    def release(self, name: str) -> Path:
        """The release dir `name`, made on first use: the app and its release.env."""
        path = self.workdir / "releases" / name
        if not path.exists():
            path.mkdir(parents=True)
            source = APPS[self.app][0]
            (path / source.name).symlink_to(source)
            env = "".join(f"{k}={v}\n" for k, v in self.release_env.items())
            (path / "release.env").write_text(env)
        return path

    def switch(self, name: str) -> None:
        tmp = self.workdir / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.release(name))
        tmp.rename(self.workdir / "current")

    def start(self) -> None:
        self.switch("r0")
        _, command, options = APPS[self.app]
        argv = [sys.executable, "-m", "deployer.master", "run", "--workers", str(self.workers),
                "--listen", f"127.0.0.1:{self.port}", "--cwd", str(self.workdir / "current"),
                "--socket", self.socket, "--log", str(self.log), *options,
                "--ready-soak", f"{READY_SOAK:g}", "--reload-batch", str(self.reload_batch),
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

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def rss(self) -> int:
        return self.status()["rss"] or 0

    def reload(self, deadline: float) -> tuple[bool, float, str]:
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


# --- anchors (bench/anchors/) ---


class NodeCluster(Target):
    """The Node cluster recipes; the primary prints RELOAD_DONE <ms> per reload."""

    baseline = "node-cluster"

    def __init__(self, mode: str, workdir: Path) -> None:
        super().__init__(workdir)
        self.mode = mode
        self.name = f"node-{mode}"
        self.signal = signal.SIGHUP if mode == "sighup" else signal.SIGUSR2
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str] = queue.Queue()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = dict(os.environ, PORT=str(self.port), WORKERS=str(self.workers))
        self.proc = subprocess.Popen(
            ["node", str(ANCHORS / "node_cluster.js"), self.mode],
            env=env, stdout=subprocess.PIPE, text=True, cwd=self.workdir,
        )  # fmt: skip
        threading.Thread(target=self.read_lines, daemon=True).start()
        self.wait_serving()

    def read_lines(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def reload(self, deadline: float) -> tuple[bool, float, str]:
        started = time.monotonic()
        os.kill(self.pid, self.signal)
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith("RELOAD_DONE"):
                return True, time.monotonic() - started, ""
        return False, time.monotonic() - started, "not finished when the run ended"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the primary SIGKILLs its workers and exits
            self.proc.wait(timeout=20)


class Pm2(Target):
    name = baseline = "pm2"

    def __init__(self, pm2: str, workdir: Path) -> None:
        super().__init__(workdir)
        self.pm2 = pm2
        self.env = dict(os.environ, PM2_HOME=str(workdir / "pm2home"), PORT=str(self.port))

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.pm2, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir)  # fmt: skip

    @property
    def pid(self) -> int:
        return int((self.workdir / "pm2home" / "pm2.pid").read_text())

    def start(self) -> None:
        r = self.cli("start", str(ANCHORS / "pm2_app.js"), "-i", str(self.workers),
                     "--name", "anchor")  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"pm2 start failed: {r.stdout}{r.stderr}")
        self.wait_serving()

    def reload(self, deadline: float) -> tuple[bool, float, str]:
        started = time.monotonic()
        try:
            r = self.cli("reload", "anchor", timeout=max(1.0, deadline - started))
        except subprocess.TimeoutExpired:
            return False, time.monotonic() - started, "not finished when the run ended"
        error = "" if r.returncode == 0 else (r.stderr or r.stdout).strip()[-200:]
        return r.returncode == 0, time.monotonic() - started, error

    def stop(self) -> None:
        self.cli("kill", timeout=60)


class Gunicorn(Target):
    """Unmodified gunicorn, 2 sync workers (its default class), reload = kill -HUP."""

    name = baseline = "gunicorn"

    def __init__(self, gunicorn: str, workdir: Path) -> None:
        super().__init__(workdir)
        self.gunicorn = gunicorn
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        argv = [self.gunicorn, "-w", str(self.workers), "-b", f"127.0.0.1:{self.port}",
                "--backlog", "2048", "--chdir", str(ANCHORS), "--log-level", "warning",
                "wsgi_app:app"]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=self.workdir)
        self.wait_serving()

    def reload(self, deadline: float) -> tuple[bool, float, str]:
        """HUP; finished when every old worker is gone and the new set is up."""
        old = set(self.worker_pids())
        started = time.monotonic()
        os.kill(self.pid, signal.SIGHUP)
        while time.monotonic() < deadline:
            now = set(self.worker_pids())
            if not now & old and len(now) >= self.workers:
                return True, time.monotonic() - started, ""
            time.sleep(0.005)
        return False, time.monotonic() - started, "not finished when the run ended"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def make_target(name: str, workdir: Path, args: argparse.Namespace) -> Target:
    if name.startswith("master-"):
        app = name.split("-", 1)[1]
        env = {"WARMUP": str(args.node_warmup)} if app == "node" else {}
        return MasterUnderTest(app, workdir, env, args.reload_batch)
    if name in ("node-sighup", "node-usr2"):
        return NodeCluster(name.split("-", 1)[1], workdir)
    if name == "pm2":
        return Pm2(args.pm2, workdir)
    if name == "gunicorn":
        return Gunicorn(args.gunicorn, workdir)
    raise SystemExit(f"unknown target {name!r}")


# --- scenarios ---


@dataclass
class Run:
    wrk: Wrk
    reloads: list[tuple[bool, float, str]] = field(default_factory=list)
    rss_max: int = 0
    master_cpu: float = 0.0  # seconds of CPU the master used during the run
    workers_cpu: float = 0.0  # seconds of CPU all workers used during the run
    load_avg: float = 0.0  # 1-minute load average at the end (other sessions share the box)
    overflows: int = 0  # accept queue overflows during the run (system-wide counter)
    accepted: int = 0  # TCP connections accepted during the run (system-wide counter)


def load_run(m: Target, args: argparse.Namespace, reloading: bool) -> Run:
    cpu_before = cpu_seconds(m.pid)
    workers_before = m.workers_cpu()
    overflows_before, accepted_before = listen_overflows(), accepted()
    wrk = run_wrk(m.port, args.connections, args.duration)
    run = Run(Wrk())
    started = time.monotonic()
    end = started + args.duration
    if reloading:
        next_at = started + args.interval
        # Stop issuing reloads early enough that the last one ends inside the run.
        while time.monotonic() < end - args.interval - 1:
            time.sleep(max(0.0, next_at - time.monotonic()))
            run.reloads.append(m.reload(end))
            run.rss_max = max(run.rss_max, m.rss())
            next_at = max(next_at + args.interval, time.monotonic())
    out, _ = wrk.communicate(timeout=args.duration + 60)
    run.wrk = parse_wrk(out)
    run.rss_max = max(run.rss_max, m.rss())
    run.master_cpu = cpu_seconds(m.pid) - cpu_before
    run.workers_cpu = m.workers_cpu() - workers_before
    run.load_avg = os.getloadavg()[0]
    run.overflows = listen_overflows() - overflows_before
    run.accepted = accepted() - accepted_before
    return run


def bench_target(name: str, args: argparse.Namespace, baselines: dict[str, list[Run]]) -> dict:
    """`--repeat` pairs of runs (no reloads, then reloads), alternating, so that
    the other sessions' load drifts over both kinds alike."""
    rows: dict = {"target": name, "baseline": [], "reload": []}
    for i in range(args.repeat):
        for reloading in (False, True):
            workdir = Path(tempfile.mkdtemp(prefix=f"bench-master-{name}-"))
            m = make_target(name, workdir, args)
            kind = "reload" if reloading else "baseline"
            shared = baselines.setdefault(m.baseline, [])
            if not reloading and len(shared) > i:
                rows["baseline"].append(shared[i])
                rows["baseline_shared"] = m.baseline
                continue
            try:
                m.start()
                time.sleep(0.5)
                run = load_run(m, args, reloading)
                rows[kind].append(run)
                if not reloading:
                    shared.append(run)
                if isinstance(m, MasterUnderTest):
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
            print(f"{name} {kind} #{i + 1}: {summary(run)}", flush=True)
    rows["runs"] = {k: rows[k] for k in ("baseline", "reload")}
    rows["baseline"], rows["reload"] = combine(rows["baseline"]), combine(rows["reload"])
    return rows


def combine(runs: list[Run]) -> Run:
    """Counts add up over the runs; rps, p99 and load average are medians."""
    med = statistics.median
    w = Wrk(
        requests=sum(r.wrk.requests for r in runs),
        seconds=sum(r.wrk.seconds for r in runs),
        rps=med(r.wrk.rps for r in runs),
        p99_ms=med(r.wrk.p99_ms for r in runs),
        **{
            k: sum(getattr(r.wrk, k) for r in runs)
            for k in ("non2xx", "connect", "read", "write", "timeout")
        },
    )
    return Run(
        wrk=w,
        reloads=[x for r in runs for x in r.reloads],
        rss_max=max(r.rss_max for r in runs),
        master_cpu=sum(r.master_cpu for r in runs),
        workers_cpu=sum(r.workers_cpu for r in runs),
        load_avg=med(r.load_avg for r in runs),
        overflows=sum(r.overflows for r in runs),
        accepted=sum(r.accepted for r in runs),
    )


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
        f" master cpu {run.master_cpu:.2f}s rss {run.rss_max / 1e6:.1f} MB,"
        f" workers cpu {run.workers_cpu:.1f}s ({per_cpu:.0f} requests per worker cpu-second),"
        f" load {run.load_avg:.1f}, accept queue overflows {run.overflows},"
        f" connections accepted {run.accepted}"
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
        (len(done) == len(reloads), f"reloads finished: {len(done)} of {len(reloads)}"),
    ]
    if "crash_restart" in rows:
        rss = max(rows["reload"].rss_max, rows["baseline"].rss_max)
        checks.append((rss <= 30e6, f"master RSS max {rss / 1e6:.1f} MB (<= 30)"))
        boot = statistics.median(rows["boot"])
        if done:
            took, limit = statistics.median(done), 1 + boot + READY_SOAK
            checks.append(
                (
                    took <= limit,
                    f"reload to last old worker stopped: median {took:.2f} s"
                    f" (<= 1 s + boot {boot:.2f} s + soak {READY_SOAK:g} s = {limit:.2f} s)",
                )
            )
        crash = statistics.median(rows["crash_restart"])
        checks.append(
            (
                crash <= 1 + boot,
                f"worker SIGKILL to ready replacement: median {crash:.2f} s"
                f" (<= 1 s + boot {boot:.2f} s)",
            )
        )
    return [f"{'met' if ok else '**missed**'}: {text}" for ok, text in checks]


HEADER = (
    "| target | run | requests | rps | p99 ms | non-2xx | connect | read | write | timeout"
    " | reloads finished | reload s (median / max) | rps per run | requests per worker cpu-s"
    " | connections accepted | accept queue overflows | load avg |"
)


def table_row(name: str, kind: str, run: Run, interval: float, runs: list[Run]) -> str:
    w = run.wrk
    ok, spread = reload_stats(run)
    label = f"reload every {interval:g} s" if kind == "reload" else "no reloads"
    cells = [
        name, label, f"{w.requests:,}", f"{w.rps:,.0f}", f"{w.p99_ms:.1f}", w.non2xx, w.connect,
        w.read, w.write, w.timeout, ok, spread, " ".join(f"{r.wrk.rps:,.0f}" for r in runs),
        f"{w.requests / max(run.workers_cpu, 0.01):,.0f}", f"{run.accepted:,}",
        f"{run.overflows:,}", f"{run.load_avg:.1f}",
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(all_rows: list[dict], args: argparse.Namespace) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        BEGIN,
        "## Master: reload under load",
        "",
        f"`python bench/reload_under_load.py --targets {args.targets}"
        f" --connections {args.connections} --duration {args.duration}"
        f" --interval {args.interval:g} --repeat {args.repeat}"
        f" --node-warmup {args.node_warmup}` ({when}):"
        f" wrk -t2 -c{args.connections} -d{args.duration}s --latency, 2 workers, a reload"
        f" every {args.interval:g} s against the same run without reloads;"
        f" {args.repeat} pair(s) of runs per target, alternating: requests, non-2xx and"
        " errors are totals over the runs, rps, p99 and load average medians. A reload is"
        " waited for until it finished (every old worker gone) or the run ended; the next"
        " one starts 2 s after the previous one started, or at once if it took longer."
        " `master-*`: `deployer master` with the example apps (each reload switches"
        f" `current` to the other release; ready_soak {READY_SOAK:g} s; master options:"
        f" python `{' '.join(APPS['python'][2])}`, node `{' '.join(APPS['node'][2])}`;"
        f" the node app answers {args.node_warmup} requests to itself before it listens,"
        " `WARMUP` in its release.env)."
        " Anchors (bench/anchors/, same"
        " trivial handler): `node-sighup` = Node cluster, SIGHUP forks a fresh set and"
        " kills the old set once the new one listens; `node-usr2` = the classic one-by-one"
        " SIGUSR2 recipe (`worker.disconnect()`, fork on exit, next on `listening`);"
        " `pm2` = pm2 cluster mode, 2 instances, `pm2 reload` (defaults); `gunicorn` ="
        " 2 sync workers (its default class), `kill -HUP`. Node"
        f" {node_version()}. {os.cpu_count()} cores shared with wrk and with other"
        " sessions' work (load average column): compare rows of the same target."
        " Accept queue overflows: the kernel's TcpExt ListenOverflows during the runs"
        " (SYNs dropped on a full queue; the client retries after 1 s, 3 s...);"
        " connections accepted: Tcp PassiveOpens (wrk opens 1 per connection, more"
        " when a worker closes keep-alive connections).",
        "",
        HEADER,
        "|" + "---|" * 2 + "---:|" * 15,
    ]
    for rows in all_rows:
        for kind in ("baseline", "reload"):
            row = table_row(rows["target"], kind, rows[kind], args.interval, rows["runs"][kind])
            if kind == "baseline" and "baseline_shared" in rows:
                row = row.replace("| no reloads |", f"| no reloads (= {rows['baseline_shared']}) |")
            lines.append(row)
    lines.append("")
    for rows in all_rows:
        lines.append(f"**{rows['target']}**: " + "; ".join(verdict(rows)) + ".")
        if "crash_restart" in rows:
            crash, boot = rows["crash_restart"], rows["boot"]
            rss = max(rows["reload"].rss_max, rows["baseline"].rss_max)
            lines.append(
                f"Master RSS max {rss / 1e6:.1f} MB. Worker SIGKILL to ready replacement:"
                f" median {statistics.median(crash):.2f} s (max {max(crash):.2f}), including"
                f" the app's boot (spawn to READY under load: median"
                f" {statistics.median(boot):.2f} s)."
            )
        else:
            rss = max(rows["reload"].rss_max, rows["baseline"].rss_max)
            lines.append(
                f"Its master process (primary / daemon / arbiter): RSS max {rss / 1e6:.1f} MB."
            )
        failures = [e for ok, _, e in rows["reload"].reloads if not ok]
        if failures:
            lines.append(f"Reloads not finished or failed: {len(failures)}: {failures[:2]}")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def node_version() -> str:
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "(not installed)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets", default="master-python,master-node,node-sighup,node-usr2,pm2,gunicorn"
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs per target")
    parser.add_argument(
        "--node-warmup", type=int, default=2000, metavar="N",
        help="master-node: requests each Node worker answers itself before it listens",
    )  # fmt: skip
    parser.add_argument(
        "--reload-batch", type=int, default=1, metavar="N",
        help="master-*: workers replaced at a time (the master's reload_batch)",
    )  # fmt: skip
    parser.add_argument("--pm2", default="pm2", help="the pm2 executable")
    parser.add_argument("--gunicorn", default="gunicorn", help="the gunicorn executable")
    parser.add_argument("--out", metavar="FILE", help="also write the markdown section here")
    parser.add_argument("--keep", action="store_true", help="keep work dirs (logs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    for tool in ("pm2", "gunicorn"):
        if tool in args.targets.split(",") and shutil.which(getattr(args, tool)) is None:
            print(f"{tool}: {getattr(args, tool)} not found (--{tool} PATH)", file=sys.stderr)
            return 2
    raise_fd_limit()
    baselines: dict[str, list[Run]] = {}
    all_rows = [bench_target(name, args, baselines) for name in args.targets.split(",")]
    section = markdown(all_rows, args)
    print(section)
    if args.json:
        print(json.dumps(all_rows, default=lambda o: o.__dict__, indent=1))
    if args.out:
        Path(args.out).write_text(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
