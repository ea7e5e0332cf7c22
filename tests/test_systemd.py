"""Boot persistence: the systemd unit `deployer setup` installs for an app on each
host, a simulated reboot that runs the unit's ExecStart exactly as installed, and
the handover of a daemonized master to the unit's master under load.

systemd is installed here but is not PID 1: `systemctl enable` works offline, and
the tests start what the unit's ExecStart says themselves, as the unit's user,
with NOTIFY_SOCKET pointing at the test. SSH hosts log in as the unprivileged
test user: a user unit (lingering cannot be enabled: no logind). A
`transport = "local"` host runs as root: a system unit, under the session's
DEPLOYER_SYSTEMD_ROOT (conftest.py), never in the machine's /etc.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from master_helpers import (
    Load,
    Masters,
    control,
    free_port,
    master_cli,
    pid_alive,
    wait_for,
)
from rollout_helpers import (
    APP,
    WORKER,
    Project,
    make_project,
    make_repo,
    master_extra,
    remove_unit,
    roles_extra,
    stop_masters,
    unit_record,
    with_roles,
)
from sshd import SSHTestHost

from deployer.hostapi.layout import Layout
from deployer.hostapi.options import MasterConfig
from deployer.master import units

CREDENTIALS = struct.Struct("3i")


# --- the contract: the call, its answer, status's boot field ---------------------------


def test_the_unit_call_and_its_answers_round_trip() -> None:
    from deployer.agent.cli import _parser
    from deployer.hostapi import answers, calls
    from deployer.hostapi.layout import Layout

    call = calls.unit("shop", "auto", deadline=99)
    argv = call.argv("python3", Layout.at("/srv/shop"), "d" * 64)
    assert argv[5:] == ["agent", "unit", "--root", "/srv/shop", "--app", "shop",
                        "--supervisor", "auto"]  # fmt: skip
    args = _parser().parse_args(argv[6:])
    assert (args.op, args.app, args.supervisor) == ("unit", "shop", "auto")
    assert call.deadline == 99
    result = answers.UnitResult(
        "auto", "deployer-shop-12345678.service", "user", "/home/d/x.service", True,
        enabled=True, enabled_now=True, linger=False, notes=["lingering is off"], boot="ok",
    )  # fmt: skip
    assert answers.parse_result(answers.result_line(result), answers.UnitResult) == result
    boot = answers.BootStatus("auto", "deployer-shop-12345678.service", "user", "/x", True)
    state = answers.HostState(
        "/srv/shop", True, None, None, None, [], [], answers.MasterState(False)
    )
    for status in (
        answers.HostStatus(state, None, None, None, None, boot),
        answers.HostStatus(state, None, None, None, None),
    ):
        line = answers.result_line(status)
        assert answers.parse_result(line, answers.HostStatus) == status


# --- the unit as text -----------------------------------------------------------------


def test_unit_name_is_unique_per_app_and_deploy_to() -> None:
    a = units.app_unit_name("shop", "/srv/shop")
    assert a.startswith("deployer-shop-") and a.endswith(".service") and len(a) == 30
    assert a == units.app_unit_name("shop", "/srv/shop")
    assert a != units.app_unit_name("shop", "/srv/shop2")
    assert a != units.app_unit_name("blog", "/srv/shop")


def test_unit_quotes_what_systemd_would_expand(tmp_path: Path) -> None:
    root = "/srv/my app/100%/$HOME"
    cfg = MasterConfig(command=("python3", "app.py"), workers=2, listen="127.0.0.1:8000")
    text = units.installed(
        Layout.at(root), "shop", "/usr/bin/python3", cfg, "system", "deploy", "/usr/bin"
    )
    assert units.exec_start(text) == [
        "/usr/bin/python3", f"{root}/.deployer/deployer.pyz", "master", "run",
        "--config", f"{root}/master.toml",
    ]  # fmt: skip
    assert "WorkingDirectory=/srv/my app/100%%/$HOME" in text
    assert "User=deploy" in text and "WantedBy=multi-user.target" in text
    user = units.installed(
        Layout.at(root), "shop", "/usr/bin/python3", cfg, "user", "deploy", "/usr/bin"
    )
    assert "User=" not in user and "WantedBy=default.target" in user
    with pytest.raises(units.UnitError, match="control character"):
        units.installed(Layout.at("/srv/a\nb"), "shop", "/usr/bin/python3", cfg, "user")
    # systemd itself reads it as written: its own verifier on the file
    path = tmp_path / units.app_unit_name("shop", root)
    path.write_text(text.replace("/usr/bin/python3", sys.executable).replace("deploy\n", "root\n"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr


def test_a_roles_unit_runs_that_roles_master_toml() -> None:
    """A host with roles has master-web.toml and master-worker.toml, no master.toml:
    each role's unit starts, reloads and is conditioned on its own file."""
    cfg = MasterConfig(command=("python3", "worker.py"), workers=2)
    texts = {}
    for role in ("web", "worker"):
        layout = Layout.at("/srv/shop", role)
        text = units.installed(layout, "shop", "/usr/bin/python3", cfg, "user", "deploy")
        toml = f"/srv/shop/master-{role}.toml"
        assert units.exec_start(text) == [
            "/usr/bin/python3", "/srv/shop/.deployer/deployer.pyz", "master", "run",
            "--config", toml,
        ]  # fmt: skip
        assert f"reload --wait --config {toml}\n" in text
        stopped = f"!/srv/shop/run/master-{role}.stopped"
        assert units.conditions(text) == ["/srv/shop/current", toml, stopped]
        assert f"Description=deployer master of shop (role {role}) in /srv/shop" in text
        assert f"SyslogIdentifier=deployer-shop-{role}" in text
        assert "/srv/shop/master.toml" not in text
        assert f"(drop-ins in {units.unit_name_of(layout, 'shop')}.d/ stay)" in text
        texts[role] = text
    assert units.unit_name_of(Layout.at("/srv/shop", "web"), "shop") == units.app_unit_name(
        "shop", "/srv/shop", "web"
    )
    assert units.app_unit_name("shop", "/srv/shop", "web").startswith("deployer-shop-web-")


# --- a local host, as root: a system unit ---------------------------------------------


def local_project(tmp_path: Path, port: int, supervisor: str | None = None) -> Project:
    repo = make_repo(tmp_path / "app", {"app.py": APP})
    extra = master_extra(port).replace("{address}", "127.0.0.1")
    if supervisor is not None:
        extra = extra.replace("[master]\n", f'[master]\nsupervisor = "{supervisor}"\n')
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        f'[app]\nname = "shop"\ndeploy_to = "{tmp_path}/host"\n{extra}\n'
        '[hosts.here]\ntransport = "local"\naddress = "127.0.0.1"\n'
    )
    return Project(repo, inventory, tmp_path / "state", [])


def systemd_root() -> Path:
    return Path(os.environ["DEPLOYER_SYSTEMD_ROOT"])


@pytest.mark.skipif(os.geteuid() != 0, reason="a system unit: a local host run as root")
@pytest.mark.timeout(120)
def test_setup_installs_and_enables_a_system_unit_and_is_idempotent(tmp_path: Path) -> None:
    port = free_port()
    project = local_project(tmp_path, port)
    root = tmp_path / "host"
    name = units.app_unit_name("shop", str(root))
    unit_dir = systemd_root() / "etc" / "systemd" / "system"
    first = project.deployer("setup", check=True).stdout
    assert f"system unit {name} written ({unit_dir / name}), enabled" in first, first
    text = (unit_dir / name).read_text()
    print(f"\n--- {unit_dir / name} ---\n{text}")
    assert (unit_dir / "multi-user.target.wants" / name).is_symlink()
    assert units.exec_start(text) == [
        *units.exec_start(text)[:1], f"{root}/.deployer/deployer.pyz", "master", "run",
        "--config", f"{root}/master.toml",
    ]  # fmt: skip
    assert "User=root" in text and "Type=notify" in text and "KillMode=mixed" in text
    assert "Restart=on-failure" in text
    assert f"ExecReload={shlex.join(units.exec_start(text)[:3])} reload --wait --config" in text
    enabled = subprocess.run(
        ["systemctl", f"--root={systemd_root()}", "is-enabled", name],
        capture_output=True, text=True,
    )  # fmt: skip
    assert enabled.stdout.strip() == "enabled"
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit_dir / name)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    again = project.deployer("setup", check=True).stdout
    assert f"system unit {name} up to date ({unit_dir / name}), already enabled" in again, again
    assert "written" not in again and "wrote" not in again
    status = project.deployer("status", "--json")
    row = json.loads(status.stdout)[0]
    assert row["problems"] == ["no release", "master not running"], row  # nothing of boot
    assert row["boot"]["comes_back"] and row["boot"]["unit"] == name
    # supervisor = "none": the unit setup installed is disabled and removed
    project.inventory.write_text(
        project.inventory.read_text().replace("[master]\n", '[master]\nsupervisor = "none"\n')
    )
    off = project.deployer("setup", check=True).stdout
    assert f'unit {name} removed; supervisor = "none"' in off, off
    assert not (unit_dir / name).exists()
    assert not (unit_dir / "multi-user.target.wants" / name).is_symlink()
    row = json.loads(project.deployer("status", "--json").stdout)[0]
    assert row["problems"] == ["no release", "master not running"], row  # their choice
    assert row["boot"]["supervisor"] == "none" and not row["boot"]["comes_back"]


@pytest.mark.timeout(120)
def test_a_host_without_systemd_says_so_in_setup_and_in_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This host's PATH has python3 and git, and no systemctl.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "git").symlink_to(shutil.which("git") or "/usr/bin/git")
    monkeypatch.setenv("PATH", str(bin_dir))
    project = local_project(tmp_path, free_port())
    out = project.deployer("setup", check=True).stdout
    said = [line.split(" here ", 1)[1].strip() for line in out.splitlines() if "reboot" in line]
    assert said == [
        "no systemd on this host (no systemctl): the master will not come back after a reboot"
    ], out
    status = project.deployer("status")
    assert status.returncode == 1
    assert (
        "  - no systemd on this host (no systemctl): the master will not come back after a"
        " reboot\n" in status.stdout
    ), status.stdout
    # "systemd" demands it: setup fails for the host, naming the key
    project.inventory.write_text(
        project.inventory.read_text().replace("[master]\n", '[master]\nsupervisor = "systemd"\n')
    )
    failed = project.deployer("setup")
    assert failed.returncode == 1
    assert '[master] supervisor = "systemd": no systemd on this host' in failed.stdout, (
        failed.stdout
    )


# --- SSH hosts, as the unprivileged test user: a user unit -----------------------------


@dataclass
class Installed:
    """The unit setup installed on a host, as its file says."""

    name: str
    path: Path
    text: str
    user: str

    @property
    def argv(self) -> list[str]:
        return units.exec_start(self.text)

    def value(self, key: str) -> str:
        return next(
            line.split("=", 1)[1] for line in self.text.splitlines() if line.startswith(key + "=")
        )

    def environment(self) -> dict[str, str]:
        """What systemd gives the ExecStart: the user's basics and Environment=."""
        pw = pwd.getpwnam(self.user)
        env = {"HOME": pw.pw_dir, "USER": self.user, "LOGNAME": self.user, "SHELL": pw.pw_shell}
        for line in self.text.splitlines():
            if line.startswith("Environment="):
                for word in shlex.split(line[len("Environment=") :]):
                    key, _, value = word.partition("=")
                    env[key] = value.replace("%%", "%")
        return env


def installed(host: SSHTestHost, role: str | None = None) -> Installed:
    record = json.loads(unit_record(host, role).read_text())
    path = Path(record["path"])
    return Installed(record["unit"], path, path.read_text(), record["user"])


class Notifications:
    """The test's NOTIFY_SOCKET (abstract: any user may send), with the sender's pid."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.name = f"deployer-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        self.sock.bind("\0" + self.name)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    @property
    def address(self) -> str:
        return "@" + self.name

    def wait(self, key: str, timeout: float) -> tuple[int, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
            pid = next(
                CREDENTIALS.unpack(payload[: CREDENTIALS.size])[0]
                for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if key in fields:
                return pid, fields

    def close(self) -> None:
        self.sock.close()


def exec_start(unit: Installed, notify: Notifications) -> subprocess.Popen[bytes]:
    """Start what the unit's ExecStart says, as its user, in its WorkingDirectory,
    with its Environment= and NOTIFY_SOCKET: what systemd does at boot."""
    pw = pwd.getpwnam(unit.user)
    switch = {}
    if os.geteuid() != pw.pw_uid:
        switch = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    return subprocess.Popen(
        unit.argv,
        cwd=unit.value("WorkingDirectory").replace("%%", "%"),
        env={**unit.environment(), "NOTIFY_SOCKET": notify.address},
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **switch,  # type: ignore[arg-type]
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(host: SSHTestHost, port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://{host.address}:{port}{path}", timeout=5) as r:
        return r.read().decode()


@pytest.fixture
def deployed(tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int) -> Iterator[Project]:
    """One SSH host, set up and rolled out: its master runs daemonized (`master start`)."""
    hosts = ssh_hosts[:1]
    project = make_project(tmp_path, hosts, {"app.py": APP}, extra=master_extra(port))
    try:
        project.setup_out = project.deployer("setup", check=True).stdout  # type: ignore[attr-defined]
        project.rollout_out = project.deployer("rollout", check=True).stdout  # type: ignore[attr-defined]
        yield project
    finally:
        stop_masters(hosts)
        remove_unit(hosts[0])


def master_pids(host: SSHTestHost, role: str | None = None) -> tuple[int, list[int]]:
    sock = "master.sock" if role is None else f"master-{role}.sock"
    status = control(host.root / "run" / sock, {"cmd": "status"})[-1]["status"]
    return status["pid"], [w["pid"] for w in status["workers"]]


@pytest.mark.timeout(180)
def test_setup_installs_a_user_unit_and_a_simulated_reboot_brings_the_master_back(
    deployed: Project, port: int, tmp_path: Path
) -> None:
    host = deployed.hosts[0]
    unit = installed(host)
    out = deployed.setup_out  # type: ignore[attr-defined]
    print(f"\n--- setup ---\n{out}--- {unit.path} ---\n{unit.text}")
    assert f"user unit {unit.name} written ({unit.path}), enabled" in out, out
    assert f"lingering is off for {unit.user}" in out  # no logind here: said, not fatal
    assert unit.path.parent == Path(pwd.getpwnam(unit.user).pw_dir) / ".config/systemd/user"
    assert (unit.path.parent / "default.target.wants" / unit.name).is_symlink()
    assert unit.argv[1:] == [
        f"{host.root}/.deployer/deployer.pyz", "master", "run",
        "--config", f"{host.root}/master.toml",
    ]  # fmt: skip
    runtime = tmp_path / "xdg-runtime"  # the user manager's; systemd-analyze --user wants one
    runtime.mkdir(mode=0o700)
    verify = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit.path)],
        capture_output=True, text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    status = deployed.deployer("status", "--json")
    assert status.returncode == 0, status.stdout  # an enabled unit: the host is ok
    boot = json.loads(status.stdout)[0]["boot"]
    assert boot["comes_back"] and f"{unit.user} lingers" in boot["why"], boot  # status keeps it
    again = deployed.deployer("setup", check=True).stdout
    assert f"user unit {unit.name} up to date ({unit.path}), already enabled" in again, again
    # lingering was said once, by the setup that installed the unit (issue 24.6b)
    assert "lingering is off" not in again + deployed.rollout_out, again  # type: ignore[attr-defined]
    assert "master running, nothing to change" in again and "wrote" not in again

    # The reboot: the master and every worker die at once, their files stay behind.
    master, workers = master_pids(host)
    for pid in (master, *workers):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in (master, *workers)), 10, "everything gone")
    assert (host.root / "run" / "master.sock").exists()  # stale, like after a power cut
    with pytest.raises(OSError):
        get(host, port)
    notify = Notifications()
    began = time.monotonic()
    proc = exec_start(unit, notify)
    try:
        pid, ready = notify.wait("READY", 30)
        took = time.monotonic() - began
        assert ready["READY"] == "1" and pid == proc.pid == int(ready["MAINPID"])
        assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam(unit.user).pw_uid
        body = get(host, port)
        current = deployed.current(host)
        print(f"reboot: READY=1 from pid {pid} after {took:.2f}s ({ready['STATUS']})")
        print(f"reboot: GET / -> {body.strip()} (current: {current})")
        assert f"release={current}" in body
        assert (host.root / "run" / "master.pid").read_text().strip() == str(proc.pid)
        status = deployed.deployer("status")
        assert status.returncode == 0, status.stdout
        # `systemctl reload` is ExecReload: the master's own client, through master.toml
        reload = subprocess.run(
            shlex.split(unit.value("ExecReload")),
            env=unit.environment(), capture_output=True, text=True, timeout=60,
            **({"user": pwd.getpwnam(unit.user).pw_uid} if os.geteuid() == 0 else {}),  # type: ignore[arg-type]
        )  # fmt: skip
        assert reload.returncode == 0 and "ok in" in reload.stdout, reload.stderr
    finally:
        stop(proc)
        notify.close()


@pytest.mark.timeout(180)
def test_a_daemonized_master_is_handed_over_to_the_unit_under_load_without_a_failed_request(
    deployed: Project, port: int
) -> None:
    host = deployed.hosts[0]
    unit = installed(host)
    old_master, old_workers = master_pids(host)
    notify = Notifications()
    proc = None
    with Load(port, threads=4, duration=90, address=host.address) as load:
        try:
            load.wait_requests(200)
            began = time.monotonic()
            proc = exec_start(unit, notify)
            pid, ready = notify.wait("READY", 30)
            took_ready = time.monotonic() - began
            wait_for(lambda: not pid_alive(old_master), 30, "the old master to exit")
            took_all = time.monotonic() - began
            served = load.result.ok
            load.wait_requests(served + 200)  # the new workers serve on
        finally:
            result = load.stop()
    try:
        assert proc is not None and pid == proc.pid
        assert not any(pid_alive(w) for w in old_workers)
        new_master, new_workers = master_pids(host)
        assert new_master == proc.pid and not set(new_workers) & set(old_workers)
        assert (host.root / "run" / "master.pid").read_text().strip() == str(proc.pid)
        log = (host.root / "log" / "master.log").read_text()
        assert f"took over from master pid {old_master}" in log
        # the old workers were serving the load's connections when they drained
        drained = re.findall(r"drained, exiting: (\d+) requests on (\d+) connections", log)
        assert sum(int(c) for _, c in drained) >= 2, drained
        print(
            f"\nhandover under load: READY=1 after {took_ready:.2f}s, old master gone after"
            f" {took_all:.2f}s; {result.failed} failed of {result.sent} requests"
        )
        assert result.failed == 0, result.summary()
        status = deployed.deployer("status")
        assert status.returncode == 0, status.stdout
    finally:
        if proc is not None:
            stop(proc)
        notify.close()


# --- handover refusals and failures: the running master serves on ----------------------


@pytest.mark.timeout(60)
def test_a_handover_whose_new_worker_fails_leaves_the_old_master_serving(
    masters: Masters,
) -> None:
    old = masters.start(workers=2)
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    new = masters.start(command=crash, workers=1, sock=old.socket, wait=False)
    assert new.wait_exit(30) == 1
    assert f"handover from master pid {old.pid} abandoned, it keeps serving" in new.log_text()
    assert old.status()["pid"] == old.pid and old.proc.poll() is None
    assert old.get("/")[0] == 200
    assert len(old.ready_workers()) == 2
    assert sorted(p.name for p in old.socket.parent.glob(".h*")) == []  # its socket is gone


@pytest.mark.timeout(60)
def test_a_handover_is_refused_while_a_reload_runs(masters: Masters) -> None:
    old = masters.start(workers=1, env={"BOOT_DELAY": "4"})
    assert "started" in old.cli("reload").stdout  # without --wait: returns as it starts
    app = str(Path(__file__).resolve().parent.parent / "examples" / "python-app" / "app.py")
    new = master_cli("run", "--socket", str(old.socket), "--listen", "127.0.0.1:1", "--",
                     sys.executable, app, timeout=30)  # fmt: skip
    assert new.returncode == 1
    assert "did not hand over: handover refused: a reload is running" in new.stderr, new.stderr
    assert old.proc.poll() is None and old.status()["pid"] == old.pid
    assert old.cli("reload", "--wait").returncode == 0  # it reloads on, undisturbed


@pytest.mark.timeout(240)
def test_a_host_with_two_roles_comes_back_after_a_reboot(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int
) -> None:
    """Each role's unit runs that role's master-ROLE.toml (a host with roles has no
    master.toml); status and doctor check what each unit would run at boot."""
    host = ssh_hosts[0]
    files = {"app.py": APP, "worker.py": WORKER}
    project = make_project(tmp_path, [host], files, extra=roles_extra(port))
    project.inventory.write_text(with_roles(project.inventory.read_text(), [host]))
    roles = ("web", "worker")
    try:
        project.deployer("setup", check=True)
        project.deployer("rollout", check=True)
        unit = {role: installed(host, role) for role in roles}
        for role in roles:
            assert unit[role].argv[1:] == [
                f"{host.root}/.deployer/deployer.pyz", "master", "run",
                "--config", f"{host.root}/master-{role}.toml",
            ]  # fmt: skip
            assert f"(role {role})" in unit[role].value("Description")
        assert not (host.root / "master.toml").exists()
        rows = json.loads(project.deployer("status", "--json", check=True).stdout)
        assert all(r["boot"]["comes_back"] for r in rows[0]["roles"]), rows

        # The unit setup wrote before this fix: master.toml, which this host lacks.
        web = unit["web"]
        web.path.write_text(web.text.replace("master-web.toml", "master.toml"))
        status = project.deployer("status")
        assert status.returncode == 1, status.stdout
        assert (
            f"web: unit {web.name} would run `{host.root}/.deployer/deployer.pyz master run"
            f" --config {host.root}/master.toml`, not" in status.stdout
        ), status.stdout
        doctor = project.deployer("doctor")
        assert doctor.returncode == 1 and "boot web" in doctor.stdout, doctor.stdout
        assert re.search(r"boot worker\s+ok", doctor.stdout), doctor.stdout
        again = project.deployer("setup", check=True).stdout
        assert f"user unit {web.name} written" in again, again
        assert installed(host, "web").text == web.text
        project.deployer("status", check=True)

        # The reboot: every master and worker of both roles dies at once.
        pids = [p for role in roles for pid, ws in [master_pids(host, role)] for p in (pid, *ws)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "everything gone")
        jobs = host.root / "shared" / "jobs.log"
        done_before = jobs.read_text().count("end ")
        notify = {role: Notifications() for role in roles}
        procs = {role: exec_start(unit[role], notify[role]) for role in roles}
        try:
            for role in roles:
                pid, ready = notify[role].wait("READY", 30)
                assert ready["READY"] == "1" and pid == procs[role].pid, (role, ready)
            current = project.current(host)
            assert f"release={current}" in get(host, port)  # web serves
            new_workers = {str(p) for p in master_pids(host, "worker")[1]}
            wait_for(lambda: jobs.read_text().count("end ") >= done_before + 2, 20, "jobs done")
            after = jobs.read_text().splitlines()
            assert any(line.split()[1] in new_workers for line in after if line.startswith("end "))
            project.deployer("status", check=True)
        finally:
            for role in roles:
                stop(procs[role])
                notify[role].close()
    finally:
        stop_masters([host])
        for role in roles:
            remove_unit(host, role)
