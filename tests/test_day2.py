"""Day-2 commands on real sshd hosts: `app logs` (-n merged by time, --since, -f
through a SIGUSR1 rotation), `exec` (exit codes, hostile arguments intact, the app's
environment, a TTY with -i), `config` and its drift check, and `doctor` (healthy,
a full disk, a stopped sshd). And their host-side parts without a network."""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from master_helpers import free_port
from rollout_helpers import (
    APP,
    Project,
    make_project,
    master_extra,
    serving,
    small_disk,
    stop_masters,
)
from sshd import SSHDFleet, SSHTestHost

from deployer import applogs, doctor, drift
from deployer.agent import ops
from deployer.agent.cli import _parser as agent_parser
from deployer.errors import BadInput
from deployer.hostapi import answers, calls
from deployer.hostapi.layout import Layout

# --- without a network --------------------------------------------------------------------


def test_since_takes_durations_and_iso_times() -> None:
    now = dt.datetime(2026, 12, 1, 11, 30, 0, 250000, tzinfo=dt.UTC)
    assert applogs.parse_since("10m", now) == "2026-12-01T11:20:00.250Z"
    assert applogs.parse_since("1h", now) == "2026-12-01T10:30:00.250Z"
    assert applogs.parse_since("2d", now) == "2026-11-29T11:30:00.250Z"
    assert applogs.parse_since("90s", now) == "2026-12-01T11:28:30.250Z"
    assert applogs.parse_since("2026-12-01T11:00:00Z") == "2026-12-01T11:00:00.000Z"
    assert applogs.parse_since("2026-12-01 12:00:00+01:00") == "2026-12-01T11:00:00.000Z"
    local = dt.datetime(2026, 12, 1, 11, 0).astimezone()  # no zone: this machine's time
    assert applogs.parse_since("2026-12-01T11:00") == applogs.log_stamp(local)
    with pytest.raises(BadInput, match="--since 'yesterday'"):
        applogs.parse_since("yesterday")


OUT_OF_RANGE = [
    "99999999999d",
    "1000000d",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00",
    "9" * 400 + "d",
]


@pytest.mark.parametrize("text", OUT_OF_RANGE)
def test_since_out_of_range_is_bad_input_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(BadInput, match="expected a time like .* or a duration ago like 30s"):
        applogs.parse_since(text)


def test_since_out_of_range_on_the_command_line_is_exit_2_not_a_traceback(tmp_path: Path) -> None:
    # parsed before any host is reached: a local host is enough
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        f'[app]\nname = "demo"\ndeploy_to = "{tmp_path}/{{host}}"\n'
        '[hosts.web1]\ntransport = "local"\n'
    )
    for text in ("99999999999d", "9999-12-31T23:59:59-14:00", "9" * 400):
        proc = subprocess.run(
            [sys.executable, "-m", "deployer", "-i", str(inventory), "app", "logs",
             "--since", text],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "DEPLOYER_STATE_DIR": str(tmp_path / "state")},
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"--since {text[:12]}" in proc.stderr.replace("'", "")
        assert "a duration ago like 30s, 10m, 1h, 2d" in proc.stderr


def _stamped(i: int) -> bytes:
    return f"2026-12-01T11:{i // 60:02d}:{i % 60:02d}.000Z [worker 1 pid 7] line {i}".encode()


@pytest.mark.parametrize("block", [7, 64, 1 << 16])
def test_the_backlog_read_backwards_is_the_tail_and_since(
    tmp_path: Path, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "LOG_BLOCK", block)
    rng = random.Random(block)
    lines: list[bytes] = []
    for i in range(300):
        lines.append(_stamped(i))
        lines += [b"  continued %d" % i] * rng.choice([0, 0, 0, 1, 3])
    path = tmp_path / "master.log"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with open(path, "rb") as f:
        size = path.stat().st_size
        for n in (0, 1, 5, 17, 10_000):
            assert ops._backlog(f, size, n, None) == lines[max(0, len(lines) - n) :]
        since = b"2026-12-01T11:03:20.000Z"  # line 200
        first = lines.index(_stamped(200))
        assert ops._backlog(f, size, None, since) == lines[first:]
        assert ops._backlog(f, size, 3, since) == lines[-3:]
        assert ops._backlog(f, size, None, b"2027") == []
        assert ops._backlog(f, size, None, b"2000") == lines


def test_the_agent_parses_the_day2_calls() -> None:
    layout = Layout.at("/srv/shop")
    hostile = ["sh", "-c", "echo $1", "a b", "$(touch /tmp/x)", ";", "*", "l1\nl2", "--root"]
    for call in (
        calls.logs(50),
        calls.logs(None, "2026-12-01T11:00:00.000Z", follow=True),
        calls.exec_command(hostile),
    ):
        argv = call.argv("python3", layout, "0" * 64)
        args = agent_parser().parse_args(argv[6:])
        assert args.op == call.op and args.root == "/srv/shop"
    args = agent_parser().parse_args(calls.exec_command(hostile).argv("p", layout, "d")[6:])
    assert json.loads(args.argv) == hostile
    args = agent_parser().parse_args(calls.logs(None, "S", follow=True).argv("p", layout, "d")[6:])
    assert (args.lines, args.since, args.follow) == (None, "S", True)


def test_the_probe_runs_on_a_bare_python_and_reads_nothing_it_should_not(tmp_path: Path) -> None:
    root = tmp_path / "srv" / "shop"
    argv = calls.probe(sys.executable, Layout.at(root), "0" * 64, "127.0.0.1:0")
    proc = subprocess.run(argv, capture_output=True, text=True, env={}, cwd="/")
    probe = answers.parse_result(proc.stdout, answers.Probe)
    assert probe is not None, proc.stderr
    assert probe.layout == answers.ProbeLayout("missing", parent=str(tmp_path), writable=True)
    assert probe.agent.state == "missing" and probe.master_toml.exists is False
    assert probe.listen == answers.ProbeListen("free") and abs(probe.time - time.time()) < 5
    assert not root.exists()  # read-only
    root.mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o777)
    probe = answers.parse_result(subprocess.run(argv, capture_output=True, text=True).stdout,
                                 answers.Probe)  # fmt: skip
    assert probe is not None and probe.layout.state == "untrusted"
    assert "writable by others" in str(probe.layout.why)


def test_the_zipapp_digest_does_not_depend_on_what_the_process_holds() -> None:
    """`deployer exec` once computed another sha256 of the same zipapp than the `deployer
    setup` that installed it (marshal's back-references follow refcounts)."""
    digests = set()
    for before in (
        "",
        "import deployer.cli, deployer.execute",
        "from deployer.hostapi import calls; held = calls.exec_command(['true'])",
    ):
        code = f"{before}\nfrom deployer.bundle import build\nprint(build().sha256)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout)
    assert len(digests) == 1


def test_config_masks_passwords_and_names_each_changed_key() -> None:
    expected = '[master]\ncommand = ["app"]\nworkers = 2\nenv = { "A" = "1", "B" = "x" }\n'
    host = '[master]\ncommand = ["app"]\nworkers = 7\nenv = { "A" = "1", "C" = "y" }\n'
    changes = drift.config_changes(host, expected, "/srv/master.toml")
    assert changes == [
        "workers: 7 on the host, 2 from the inventory",
        'env B: unset on the host, "x" from the inventory',
        'env C: "y" on the host, unset from the inventory',
    ]
    masked = drift._masked({"url": "postgresql://u:hunter2@db/x", "list": ["http://a:b@c/"]})
    assert masked == {"url": "postgresql://u:***@db/x", "list": ["http://a:***@c/"]}


# --- on real hosts ------------------------------------------------------------------------


def _as_host_user(path: Path, host: SSHTestHost) -> None:
    user = pwd.getpwnam(host.user)
    os.chown(path, user.pw_uid, user.pw_gid)


def _write_log(host: SSHTestHost, lines: list[str]) -> Path:
    path = host.root / "log" / "master.log"
    path.write_text("".join(line + "\n" for line in lines))
    _as_host_user(path, host)
    return path


def _stamp(second: int) -> str:
    return f"2026-12-01T11:00:{second:02d}.000Z"


def test_app_logs_n_merges_the_hosts_by_time(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> None:
    p = make_project(tmp_path, ssh_hosts, {"app.py": APP})
    p.deployer("setup", check=True)
    h1, h2, h3 = ssh_hosts
    _write_log(h1, [f"{_stamp(1)} [master 11] a1", f"{_stamp(4)} [master 11] a2",
                    f"{_stamp(7)} [worker 1 pid 12] a3", "Traceback (most recent call last):",
                    "  a3 continued"])  # fmt: skip
    _write_log(h2, [f"{_stamp(s)} [master 21] b{i}" for i, s in enumerate((2, 5, 8), 1)])
    _write_log(h3, [f"{_stamp(s)} [master 31] c{i}" for i, s in enumerate((3, 6, 9), 1)])

    proc = p.deployer("app", "logs", "-n", "3", check=True)
    assert proc.stdout.splitlines() == [
        f"host2: {_stamp(2)} [master 21] b1",
        f"host3: {_stamp(3)} [master 31] c1",
        f"host2: {_stamp(5)} [master 21] b2",
        f"host3: {_stamp(6)} [master 31] c2",
        f"host1: {_stamp(7)} [worker 1 pid 12] a3",
        "host1: Traceback (most recent call last):",  # goes with a3, the line above it
        "host1:   a3 continued",
        f"host2: {_stamp(8)} [master 21] b3",
        f"host3: {_stamp(9)} [master 31] c3",
    ], proc.stdout
    assert "\x1b" not in proc.stdout  # not a terminal: no colors

    proc = p.deployer("app", "logs", "--since", "2026-12-01T11:00:06Z", check=True)
    assert [line.split()[-1] for line in proc.stdout.splitlines()] == [
        "c2", "a3", "last):", "continued", "b3", "c3",
    ]  # fmt: skip
    proc = p.deployer("app", "logs", "--hosts", "host2", "-n", "1", check=True)
    assert proc.stdout == f"host2: {_stamp(8)} [master 21] b3\n"

    (h3.root / "log" / "master.log").unlink()
    proc = p.deployer("app", "logs", check=True)  # default: the last 50 of each
    assert len(proc.stdout.splitlines()) == 8
    assert f"host3: no log yet at {h3.root}/log/master.log" in proc.stderr

    proc = p.deployer("app", "logs", "--since", "last tuesday")
    assert proc.returncode == 2 and "--since 'last tuesday'" in proc.stderr


def _as_at_a_terminal() -> None:
    """SIGINT as a terminal's foreground command has it. A suite started in the
    background of a script (`pytest ... &`: no job control) inherits SIGINT ignored,
    and Python, like any program, then leaves it ignored: Ctrl-C could not be tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Follow:
    """`deployer app logs -f` running; its stdout lines collected as they come."""

    def __init__(self, project: Project, *args: str) -> None:
        env = {**os.environ, "DEPLOYER_STATE_DIR": str(project.state)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deployer", "-i", str(project.inventory), "app", "logs",
             "-f", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            preexec_fn=_as_at_a_terminal,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, what: str, test: Callable[[list[str]], bool], timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not test(list(self.lines)):
            if time.monotonic() > end or self.proc.poll() is not None:
                tail = "\n".join(self.lines[-30:])
                raise AssertionError(f"no {what} within {timeout}s; output:\n{tail}")
            time.sleep(0.1)

    def stop(self) -> tuple[int, str]:
        """Ctrl-C; the exit code and stderr."""
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def _master_pid(host: SSHTestHost) -> int:
    return int((host.root / "run" / "master.pid").read_text())


@pytest.fixture
def running(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> Iterator[Project]:
    """Three hosts serving the example app under their masters, with [env] and a secret."""
    port = free_port()
    extra = master_extra(port) + '[env]\nGREETING = "hello from {host}"\n'
    with serving(tmp_path, ssh_hosts, {"app.py": APP}, extra) as p:
        yield p


def test_app_logs_follow_goes_on_through_a_rotation(running: Project) -> None:
    h1, h2, h3 = running.hosts
    follow = Follow(running, "-n", "3")
    try:
        follow.wait_for("the backlog", lambda ls: len(ls) >= 9)
        backlog = [x.split(":")[0] for x in follow.lines[:9]]  # -n 3 of each host
        assert sorted(backlog) == ["host1"] * 3 + ["host2"] * 3 + ["host3"] * 3
        # logrotate's way: move the log aside, then SIGUSR1 makes the master reopen it
        log = h1.root / "log" / "master.log"
        log.rename(log.with_name("master.log.1"))
        os.kill(_master_pid(h1), signal.SIGUSR1)
        follow.wait_for("the reopen", lambda ls: any("host1: " in x and "log reopened" in x
                                                        for x in ls))  # fmt: skip
        assert log.exists()
        mark = len(follow.lines)
        for h in running.hosts:  # a reload: the masters and new workers write lines
            os.kill(_master_pid(h), signal.SIGHUP)
        follow.wait_for(
            "new workers' lines from every host",
            lambda ls: all(
                any(x.startswith(f"{h.name}: ") and "serving release" in x for x in ls[mark:])
                for h in running.hosts
            ),
        )
        new_host1 = [x for x in follow.lines[mark:] if x.startswith("host1: ")]
        assert any("[master " in x for x in new_host1) and any("[worker " in x for x in new_host1)
    finally:
        code, stderr = follow.stop()
    assert code == 0, stderr
    assert sum("log reopened" in x for x in follow.lines) == 1
    stamps = [x.split(" ")[1] for x in follow.lines[mark:]]
    assert all(s.endswith("Z") for s in stamps)
    assert "FAILED" not in stderr


def test_app_logs_follow_ends_when_idle_and_without_a_log(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    p = make_project(tmp_path, ssh_hosts[:2], {"app.py": APP})
    p.deployer("setup", check=True)
    _write_log(ssh_hosts[0], [f"{_stamp(1)} [master 1] before"])

    started = time.monotonic()
    follow = Follow(p, "--until-idle", "4")
    before = f"host1: {_stamp(1)} [master 1] before"
    follow.wait_for("the first host's line", lambda lines: before in lines)
    # a log that appears once the follow began is followed too
    _write_log(ssh_hosts[1], [f"{_stamp(2)} [master 2] born late"])
    assert follow.proc.wait(60) == 0, follow.proc.stderr.read() if follow.proc.stderr else ""
    follow.reader.join(5)
    assert follow.lines == [before, f"host2: {_stamp(2)} [master 2] born late"]
    assert time.monotonic() - started < 30


HOSTILE = ["a b", "$(touch {marker})", ";", "*", "line1\nline2", "`id`", "'", '"', "--x", ""]


def test_exec_runs_in_current_with_the_apps_environment(running: Project, tmp_path: Path) -> None:
    h1, h2, h3 = running.hosts
    secret = "s3cr3t-" + os.urandom(6).hex()
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(running.inventory), "secrets", "set", "TOKEN"],
        input=secret, capture_output=True, text=True,
        env={**os.environ, "DEPLOYER_STATE_DIR": str(running.state)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    # hostile arguments arrive as they were given, none run by any shell
    marker = tmp_path / "pwned"
    args = [a.replace("{marker}", str(marker)) for a in HOSTILE]
    script = "import json, sys; print(json.dumps(sys.argv[1:]))"
    proc = running.deployer("exec", "--", "python3", "-c", script, *args, check=True)
    for h in running.hosts:
        assert f"{h.name}: {json.dumps(args)}" in proc.stdout.splitlines(), proc.stdout
    assert not marker.exists()

    # in current/, with [env] and the secret (the value itself never printed)
    script = (
        "import hashlib, os; print(os.getcwd(), os.environ['GREETING'], "
        "hashlib.sha256(os.environ['TOKEN'].encode()).hexdigest())"
    )
    proc = running.deployer("exec", "--hosts", "host2", "--", "python3", "-c", script, check=True)
    digest = __import__("hashlib").sha256(secret.encode()).hexdigest()
    release = os.path.realpath(h2.root / "current")
    assert proc.stdout == f"host2: {release} hello from host2 {digest}\n"
    assert secret not in proc.stdout + proc.stderr

    # the exit code: 0 only if every host's was; the failing ones named with theirs
    script = "import os, sys; print('on', os.environ['GREETING']); sys.exit(3 if " \
             "os.environ['GREETING'].endswith('host2') else 0)"  # fmt: skip
    proc = running.deployer("exec", "--parallel", "1", "--", "python3", "-c", script)
    assert proc.returncode == 1
    assert sorted(proc.stdout.splitlines()) == [f"{h.name}: on hello from {h.name}"
                                                for h in running.hosts]  # fmt: skip
    assert "failed on 1 of 3 host(s): host2 (exit 3)" in proc.stderr
    proc = running.deployer("exec", "--", "sh", "-c", "echo out; echo err >&2")
    assert proc.returncode == 0 and sorted(proc.stdout.splitlines())[:2] == [
        "host1: err",
        "host1: out",
    ]
    proc = running.deployer("exec", "--hosts", "host1", "--", "no-such-command-here")
    assert proc.returncode == 1
    assert "host1: FAILED: no-such-command-here: No such file or directory" in proc.stderr

    # a console: a TTY there, for one host only
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(running.inventory), "exec", "-i",
         "--hosts", "host3", "--", "python3", "-c",
         "import os; print('tty', os.isatty(0), os.isatty(1))"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        env={**os.environ, "DEPLOYER_STATE_DIR": str(running.state)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tty True True" in proc.stdout
    proc = running.deployer("exec", "-i", "--", "true")
    assert proc.returncode == 2
    assert "needs exactly one host, 3 selected (host1, host2, host3)" in proc.stderr

    # doctor on hosts that run: the port is our master's
    proc = running.deployer("doctor", check=True)
    assert f"host1: listen   ok   {h1.address}:" in proc.stdout, proc.stdout
    assert "served by this app's master (pid " in proc.stdout


def test_config_shows_what_each_host_gets_and_diff_finds_a_hand_edit(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    port = free_port()
    extra = (
        master_extra(port)
        + '[env]\nGREETING = "hello from {host}"\nDATABASE_URL = "postgresql://app:hunter2@db/x"\n'
    )
    p = make_project(tmp_path, ssh_hosts, {"app.py": APP}, extra=extra)
    proc = p.deployer("config", check=True)
    assert "# host2: 127.0.0." in proc.stdout
    assert 'GREETING = "hello from host2"' in proc.stdout
    assert 'DATABASE_URL = "postgresql://app:***@db/x"' in proc.stdout
    assert "hunter2" not in proc.stdout
    confs = json.loads(p.deployer("config", "--json", "--hosts", "host1", check=True).stdout)
    assert confs[0]["master"]["workers"] == 2 and confs[0]["env"]["GREETING"] == "hello from host1"
    assert confs[0]["master"]["listen"] == f"{ssh_hosts[0].address}:{port}"

    # before setup: every host differs (nothing there)
    proc = p.deployer("config", "--diff")
    assert proc.returncode == 1 and "master.toml is missing" in proc.stdout
    p.deployer("setup", check=True)
    proc = p.deployer("config", "--diff")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("same as the inventory") == 3

    # an operator edits host2's master.toml by hand
    toml = ssh_hosts[1].root / "master.toml"
    text = toml.read_text()
    toml.write_text(text.replace("workers = 2", "workers = 5").replace("hello from", "hi from"))
    proc = p.deployer("config", "--diff")
    assert proc.returncode == 1
    out = proc.stdout
    assert "host1: same as the inventory" in out and "host3: same as the inventory" in out
    assert "host2: DIFFERS" in out
    assert "  - workers: 5 on the host, 2 from the inventory" in out
    assert '  - env GREETING: "hi from host2" on the host, "hello from host2" from' in out
    assert f"--- host2:{toml}" in out
    assert "-workers = 5" in out and "+workers = 2" in out
    assert "hunter2" not in out
    rows = json.loads(p.deployer("config", "--diff", "--json").stdout)
    assert [r["differs"] for r in rows] == [False, True, False]
    p.deployer("setup", check=True)  # setup writes it back: no drift
    assert p.deployer("config", "--diff").returncode == 0


def _checks(stdout: str, host: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in stdout.splitlines():
        name, check, status, detail = line.split(None, 3)
        if name == f"{host}:":
            out[check] = (status, detail)
    return out


def test_doctor_before_setup_and_on_a_full_disk(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    host = ssh_hosts[0]
    port = free_port()
    p = make_project(tmp_path, [host], {"app.py": APP}, extra=master_extra(port))
    proc = p.deployer("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = _checks(proc.stdout, host.name)
    assert list(checks) == ["ssh", "python", "disk", "layout", "systemd", "listen", "clock"]
    assert checks["ssh"][0] == "ok" and "host key verified" in checks["ssh"][1]
    assert checks["python"][0] == "ok"
    assert checks["layout"] == ("ok", f"{host.root} not set up yet: run `deployer setup`")
    assert checks["listen"] == ("ok", f"{host.address}:{port} is free")
    assert checks["clock"][0] == "ok"
    assert not (host.root / "releases").exists()  # read-only: nothing made

    with small_disk(p, host) as disk:
        p.deployer("setup", check=True)
        proc = p.deployer("doctor")
        assert proc.returncode == 1, proc.stdout
        status, detail = _checks(proc.stdout, host.name)["disk"]
        assert status == "FAIL"
        assert "MB free of 1.0 MB (" in detail
        assert detail.endswith(f"under {disk}/{host.name}: less than 100 MB"), detail
        layout = _checks(proc.stdout, host.name)["layout"]
        assert layout[0] == "ok" and "agent up to date" in layout[1]


def test_doctor_names_a_host_whose_sshd_is_down(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], sshd_fleet: SSHDFleet
) -> None:
    p = make_project(tmp_path, ssh_hosts[:2], {"app.py": APP})
    down = ssh_hosts[1]
    sshd_fleet.stop(down)
    try:
        started = time.monotonic()
        proc = p.deployer("doctor", "--timeout", "2")
        took = time.monotonic() - started
    finally:
        sshd_fleet.ensure_running([down])
    assert proc.returncode == 1, proc.stdout
    assert _checks(proc.stdout, "host1")["ssh"][0] == "ok"
    status, detail = _checks(proc.stdout, "host2")["ssh"]
    assert status == "FAIL"
    assert f"connection refused at {down.address}:{down.port} (no sshd listening?" in detail
    assert _checks(proc.stdout, "host2")["python"] == ("skip", "not checked: no connection")
    assert took < 20


def test_doctor_names_the_owner_of_its_own_address_not_another_hosts_master(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    """Two hosts on one machine (127.0.0.x): host1's master listens on host1's address
    and PORT; on host2's address and PORT a process of another user (this test) does.
    doctor on host2 names that, never host1's master (issue 24.6g)."""
    import socket

    host1, host2 = ssh_hosts[:2]
    port = free_port()
    p = make_project(tmp_path, [host1, host2], {"app.py": APP}, extra=master_extra(port))
    try:
        p.deployer("setup", "--hosts", "host1", check=True)
        p.deployer("rollout", "--hosts", "host1", check=True)
        master = int((host1.root / "run" / "master.pid").read_text())
        with socket.socket() as squatter:
            squatter.bind((host2.address, port))
            squatter.listen()
            proc = p.deployer("doctor", "--hosts", "host2")
        mine = p.deployer("doctor", "--hosts", "host1")
    finally:
        stop_masters([host1])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status, detail = _checks(proc.stdout, "host2")["listen"]
    assert status == "FAIL" and f"{host2.address}:{port}" in detail, detail
    assert "a process of another user" in detail and str(master) not in detail, detail
    assert (
        f"served by this app's master (pid {master})" in _checks(mine.stdout, "host1")["listen"][1]
    )


OLD_PYTHON = Path("/root/.pyenv/versions/3.6.15/bin/python3")


@pytest.mark.skipif(not os.access(OLD_PYTHON, os.X_OK), reason=f"no {OLD_PYTHON} (pyenv)")
def test_the_probe_names_an_old_python_by_its_version(tmp_path: Path) -> None:
    argv = calls.probe(str(OLD_PYTHON), Layout.at(tmp_path / "x"), "0" * 64, None)
    probe = answers.parse_result(subprocess.run(argv, capture_output=True, text=True).stdout,
                                 answers.Probe)  # fmt: skip
    assert probe is not None and probe.python == "3.6.15"
    check = doctor._python(probe, "python3")
    assert (check.status, check.detail) == (
        "FAIL", f"3.6.15 ({OLD_PYTHON}): the host agent needs Python 3.9 or later"
    )  # fmt: skip
