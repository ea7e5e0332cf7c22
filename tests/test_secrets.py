"""[env] and `deployer secrets` on real sshd hosts: the workers get both, a secret
changes under load through the one-by-one reload, and the secret's value appears
in no output, no file on the controller or the hosts (but its own), and no
process's command line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import Load, free_port
from rollout_helpers import APP, Project, commit, make_project, stop_masters
from sshd import SSHTestHost


def extra(port: int) -> str:
    return (
        f'[master]\ncommand = "python3 app.py"\nlisten = "{{address}}:{port}"\nworkers = 2\n'
        "ready_soak = 0.3\nshutdown_timeout = 5\nready_timeout = 10\n"
        '[env]\nGREETING = "hello from {host}"\n'
        "[rollout]\nwatch = 0\n"
    )


@pytest.fixture
def project(tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int) -> Iterator[Project]:
    hosts = ssh_hosts[:2]
    p = make_project(tmp_path, hosts, {"app.py": APP}, extra=extra(port))
    try:
        yield p
    finally:
        stop_masters(hosts)


def get(host: SSHTestHost, port: int, name: str) -> str:
    """The sha256 of the worker's variable `name` (the example app's /env/NAME)."""
    import http.client

    conn = http.client.HTTPConnection(host.address, port, timeout=10)
    try:
        conn.request("GET", f"/env/{name}")
        return conn.getresponse().read().decode().strip()
    finally:
        conn.close()


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def run_with_stdin(project: Project, stdin: str, *args: str):
    import subprocess
    import sys

    env = {**os.environ, "DEPLOYER_STATE_DIR": str(project.state)}
    return subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(project.inventory), *args],
        input=stdin, capture_output=True, text=True, cwd=project.repo, env=env, timeout=120,
    )  # fmt: skip


def test_env_and_secrets_reach_the_workers_and_nothing_else(project: Project, port: int) -> None:
    secret = "s3cr3t-" + os.urandom(8).hex()
    newer = "s3cr3t-" + os.urandom(8).hex()
    outputs = [project.deployer("setup", check=True)]
    proc = run_with_stdin(project, secret + "\n", "secrets", "set", "API_TOKEN")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outputs.append(proc)
    outputs.append(project.deployer("rollout", check=True))
    for h in project.hosts:
        assert get(h, port, "GREETING") == digest(f"hello from {h.name}")
        assert get(h, port, "API_TOKEN") == digest(secret)
        path = h.root / "shared" / ".deployer-secrets.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # a new value, under load, through the one-by-one reload: no request fails
    host = project.hosts[0]
    with Load(port, threads=3, duration=60, address=host.address) as load:
        load.wait_requests(20)
        proc = run_with_stdin(project, newer, "secrets", "set", "API_TOKEN", "--reload")
        load.wait_requests(load.result.ok + 20)
        result = load.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outputs.append(proc)
    assert "workers reloaded with it" in proc.stdout
    assert result.failed == 0, result.summary()
    assert all(get(h, port, "API_TOKEN") == digest(newer) for h in project.hosts)

    listed = project.deployer("secrets", "list", check=True)
    assert listed.stdout == "API_TOKEN: all hosts\n"
    outputs.append(listed)
    commit(project.repo, {"release.env": "CRASH_AT_BOOT=1\n"}, "a release that fails")
    outputs.append(project.deployer("rollout"))  # fails: crashes at boot, rolled back
    outputs += [project.deployer(*args) for args in (["status"], ["history"], ["status", "--json"])]
    outputs.append(project.deployer("master", "status", "--json", "--socket",
                                    str(host.root / "run" / "master.sock")))  # fmt: skip

    places = {f"output of {' '.join(p.args[4:])}": p.stdout + p.stderr for p in outputs}
    secret_files = {h.root / "shared" / ".deployer-secrets.json" for h in project.hosts}
    for path in [*project.state.rglob("*"), *(f for h in project.hosts for f in h.root.rglob("*"))]:
        if path.is_file() and not path.is_symlink() and path not in secret_files:
            places[str(path)] = path.read_bytes().decode(errors="replace")
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            places[str(cmdline)] = cmdline.read_text(errors="replace")
    found = [where for where, text in places.items() if secret in text or newer in text]
    assert found == [], found
    print(f"secret grep: {len(places)} places searched, none holds it")


def test_secret_names_are_checked_and_values_never_echoed(project: Project) -> None:
    project.deployer("setup", check=True)
    proc = run_with_stdin(project, "x", "secrets", "set", "NOT-A-NAME")
    assert proc.returncode == 2 and "expected an environment variable name" in proc.stderr
    proc = run_with_stdin(project, "value-that-must-not-show", "secrets", "set", "A")
    assert proc.returncode == 0 and "value-that-must-not-show" not in proc.stdout + proc.stderr
    again = run_with_stdin(project, "value-that-must-not-show", "secrets", "set", "A")
    assert "A unchanged" in again.stdout
    gone = project.deployer("secrets", "unset", "A", check=True)
    assert "A removed" in gone.stdout
    assert project.deployer("secrets", "list", check=True).stdout == "no secrets\n"


def secrets_on(host: SSHTestHost) -> dict[str, str] | None:
    """The host's secrets file as a dict; None if there is none."""
    import json

    path = host.root / "shared" / ".deployer-secrets.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.mark.parametrize("key", ["LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET", "DEPLOYER_TOKEN"])
def test_the_controller_refuses_a_reserved_name_before_any_host(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], key: str
) -> None:
    # no `setup`: a call that reached a host would fail there, not with this message
    project = make_project(tmp_path, ssh_hosts[:1], {"app.py": APP}, extra=extra(free_port()))
    proc = run_with_stdin(project, "1\n", "secrets", "set", key)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    mine = "DEPLOYER_* names are deployer's own"
    why = mine if key.startswith("DEPLOYER_") else "set by the master for every worker"
    assert f"KEY {key}: {why}" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and secrets_on(project.hosts[0]) is None


def test_an_empty_value_is_refused_unless_asked_for(project: Project) -> None:
    """`deployer secrets set KEY < /dev/null` (an unset CI variable piped in) once blanked
    the secret on every host."""
    project.deployer("setup", check=True)
    assert run_with_stdin(project, "kept\n", "secrets", "set", "TOKEN").returncode == 0
    for stdin in ("", "\n"):
        proc = run_with_stdin(project, stdin, "secrets", "set", "TOKEN")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "secrets set TOKEN: the value is empty" in proc.stderr
        assert "--allow-empty" in proc.stderr and "Traceback" not in proc.stderr
    assert all(secrets_on(h) == {"TOKEN": "kept"} for h in project.hosts)
    proc = run_with_stdin(project, "", "secrets", "set", "TOKEN", "--allow-empty")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(secrets_on(h) == {"TOKEN": ""} for h in project.hosts)


def test_the_agent_refuses_a_reserved_name_itself(tmp_path: Path) -> None:
    """The controller refuses these first; the agent does not rely on it."""
    from deployer.agent.ops.common import AgentError
    from deployer.agent.ops.secrets import secrets
    from deployer.hostapi.layout import Layout

    layout = Layout.at(tmp_path)
    layout.shared.mkdir(parents=True)
    for key in ("LISTEN_FDS", "NOTIFY_SOCKET", "DEPLOYER_READY_FD"):
        with pytest.raises(AgentError, match=f"secrets set {key}: .*pick another name"):
            secrets(layout, "set", key)
    assert not layout.secrets.exists()


def test_reserved_names_in_a_hosts_secrets_file_reach_no_worker_and_no_exec(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], port: int
) -> None:
    """A secrets file that holds a reserved name anyway (hand-edited, an older
    deployer): a delay-ready worker gets no NOTIFY_SOCKET from the master, so a
    planted one would reach it; the master and exec leave it out and say so."""
    host = ssh_hosts[0]
    text = extra(port).replace("workers = 2\n", 'workers = 1\nready = "delay:0.2"\n')
    project = make_project(tmp_path, [host], {"app.py": APP}, extra=text)
    try:
        project.deployer("setup", check=True)
        planted = {"NOTIFY_SOCKET": "/nonexistent/notify", "DEPLOYER_PLANTED": "x", "KEPT": "k"}
        path = host.root / "shared" / ".deployer-secrets.json"
        path.write_text(json.dumps(planted))
        path.chmod(0o600)
        shutil.chown(path, host.user, host.user)  # the tests run as root; the master does not
        project.deployer("rollout", check=True)
        assert get(host, port, "KEPT") == digest("k")
        assert get(host, port, "NOTIFY_SOCKET") == digest("")
        assert get(host, port, "DEPLOYER_PLANTED") == digest("")
        logs = "".join(p.read_text() for p in (host.root / "log").glob("master*.log"))
        assert "ignored DEPLOYER_PLANTED, NOTIFY_SOCKET (reserved" in logs

        script = f"import os; print([os.environ.get(k) for k in {sorted(planted)!r}])"
        proc = project.deployer("exec", "--", "python3", "-c", script, check=True)
        assert "[None, 'k', None]" in proc.stdout
        assert "ignored DEPLOYER_PLANTED, NOTIFY_SOCKET (reserved" in proc.stdout + proc.stderr
        # the operator can still see and remove them
        assert "NOTIFY_SOCKET: all hosts" in project.deployer("secrets", "list").stdout
        project.deployer("secrets", "unset", "NOTIFY_SOCKET", check=True)
        assert "NOTIFY_SOCKET" not in json.loads(path.read_text())
    finally:
        stop_masters([host])
