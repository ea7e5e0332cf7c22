"""The keeper ([ssh] persist): one SSH connection and agent session per host kept
between commands, on real sshd hosts; the keeper's process ended by pid."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import wait_for
from rollout_helpers import Project, commit, make_project
from sshd import SSHDFleet, SSHTestHost, _sshd_descendants
from users import as_user, needs_root

from deployer import keeper


def persisting(project: Project, seconds: float) -> Project:
    text = project.inventory.read_text()
    project.inventory.write_text(text.replace("[ssh]\n", f"[ssh]\npersist = {seconds}\n", 1))
    return project


def keeper_socket(project: Project, monkeypatch: pytest.MonkeyPatch) -> Path | None:
    """The socket of the keeper the project's commands use (their state dir names it)."""
    with monkeypatch.context() as m:
        m.setenv("DEPLOYER_STATE_DIR", str(project.state))
        return keeper.socket_path()


def keeper_pid(project: Project, monkeypatch: pytest.MonkeyPatch) -> int | None:
    path = keeper_socket(project, monkeypatch)
    return None if path is None else keeper.pid_of(path)


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def keepers():
    """pids of keepers a test saw; whichever still runs at the end is ended."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 5.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def connections(sshd_fleet: SSHDFleet, host: SSHTestHost) -> set[int]:
    listener = sshd_fleet.pid(host)
    assert listener is not None
    return set(_sshd_descendants(listener))


def deployed_with_a_keeper(
    tmp_path: Path, ssh_hosts, keepers: list[int], monkeypatch
) -> tuple[Project, int]:
    """A project with `persist = 30`, set up and rolled out: its keeper's pid."""
    project = persisting(make_project(tmp_path, ssh_hosts, {"app.txt": "v1\n"}), 30)
    project.deployer("setup", check=True)
    project.deployer("rollout", check=True)
    pid = keeper_pid(project, monkeypatch)
    assert pid is not None
    keepers.append(pid)
    return project, pid


def test_later_commands_reuse_the_connections_and_disconnect_ends_them(
    tmp_path: Path, ssh_hosts, sshd_fleet, keepers, monkeypatch
) -> None:
    project, pid = deployed_with_a_keeper(tmp_path, ssh_hosts, keepers, monkeypatch)
    path = keeper_socket(project, monkeypatch)
    assert path is not None
    # setup asked for the 3 hosts' sessions at once: one keeper was started, not 3
    assert "another keeper" not in path.with_suffix(".log").read_text()
    host = project.hosts[0]
    before = connections(sshd_fleet, host)
    assert before  # the keeper's connection, open between commands
    commit(project.repo, {"app.txt": "v2\n"}, "v2")
    project.deployer("rollout", check=True)
    project.deployer("rollback", check=True)
    project.deployer("status", check=True)
    assert keeper_pid(project, monkeypatch) == pid
    assert connections(sshd_fleet, host) == before  # no new SSH connection for those

    # killed between commands: the next command starts another keeper
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    project.deployer("rollout", check=True)
    second = keeper_pid(project, monkeypatch)
    assert second is not None and second != pid
    keepers.append(second)

    out = project.deployer("disconnect", check=True).stdout
    assert out == f"keeper (pid {second}) stopped\n"
    assert wait_gone(second)
    # its SSH connections closed with it
    wait_for(lambda: not connections(sshd_fleet, host), 10, "the keeper's connections to close")
    assert not list(path.parent.glob(path.stem + ".*"))  # nor any file of its
    assert project.deployer("disconnect", check=True).stdout == "no keeper was running\n"


def test_a_connection_cut_between_commands_is_reopened(
    tmp_path: Path, ssh_hosts, sshd_fleet, keepers, monkeypatch
) -> None:
    project, pid = deployed_with_a_keeper(tmp_path, ssh_hosts, keepers, monkeypatch)
    victim = project.hosts[1]
    for sshd in connections(sshd_fleet, victim):
        with contextlib.suppress(ProcessLookupError):  # gone with its parent
            os.kill(sshd, signal.SIGKILL)
    commit(project.repo, {"app.txt": "v2\n"}, "v2")
    proc = project.deployer("rollout")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(project.revision(h) == project.revision(project.hosts[0]) for h in project.hosts)
    assert keeper_pid(project, monkeypatch) == pid


@pytest.mark.parametrize("how", ["idle", "SIGTERM"])
def test_the_keeper_ends_by_itself_once_idle_or_on_sigterm(
    tmp_path: Path, ssh_hosts, keepers, monkeypatch, how: str
) -> None:
    persist = 1 if how == "idle" else 60
    project = persisting(make_project(tmp_path, ssh_hosts[:1], {"app.txt": "v1\n"}), persist)
    project.deployer("setup", check=True)
    path = keeper_socket(project, monkeypatch)
    pid = keeper_pid(project, monkeypatch)
    assert path is not None and pid is not None
    keepers.append(pid)
    if how == "SIGTERM":
        os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid, 10.0)  # 1 s idle, or at once, then it closes up
    assert not list(path.parent.glob(path.stem + ".*"))  # and leaves no file behind


def test_no_keeper_without_a_directory_only_this_user_can_enter(
    tmp_path: Path, ssh_hosts, keepers, monkeypatch
) -> None:
    """A socket directory others can enter would hand them our sessions: the command
    then connects by itself, as without persist."""
    runtime = tmp_path / "runtime"
    (runtime / "deployer").mkdir(parents=True)
    (runtime / "deployer").chmod(0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    project = persisting(make_project(tmp_path, ssh_hosts[:1], {"app.txt": "v1\n"}), 30)
    project.deployer("setup", check=True)
    project.deployer("rollout", check=True)
    assert keeper_pid(project, monkeypatch) is None
    assert list((runtime / "deployer").iterdir()) == []
    assert stat.S_IMODE((runtime / "deployer").stat().st_mode) == 0o755


def test_a_host_key_refused_reads_the_same_through_the_keeper(
    tmp_path: Path, ssh_hosts, keepers, monkeypatch
) -> None:
    project = make_project(tmp_path, ssh_hosts[:1], {"app.txt": "v1\n"})
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    text = project.inventory.read_text()
    known = str(ssh_hosts[0].known_hosts)
    project.inventory.write_text(text.replace(known, str(empty)))
    direct = project.deployer("status")
    persisting(project, 30)
    kept = project.deployer("status")
    pid = keeper_pid(project, monkeypatch)
    if pid is not None:
        keepers.append(pid)
    assert direct.returncode == kept.returncode != 0
    assert "host key" in direct.stdout + direct.stderr
    assert kept.stdout == direct.stdout and kept.stderr == direct.stderr


def test_another_agent_never_gets_the_previous_agents_session(tmp_path: Path) -> None:
    """The agent's sha256 is in the session's argv: a controller with another agent
    (after `deployer setup` upgraded the hosts) gets sessions of its own."""
    from deployer.inventory import SSHConfig

    spec = {"name": "web1", "address": "127.0.0.2", "ssh": keeper._ssh_dict(SSHConfig())}
    k = keeper.Keeper(tmp_path / "k.sock")
    first = k.host(spec, ["python3", "-c", "BOOTSTRAP", "deployer.pyz", "aaaa", "agent"])
    again = k.host(spec, ["python3", "-c", "BOOTSTRAP", "deployer.pyz", "aaaa", "agent"])
    other = k.host(spec, ["python3", "-c", "BOOTSTRAP", "deployer.pyz", "bbbb", "agent"])
    assert first is again and other is not first
    assert first.relay is None  # the keeper's own hosts connect directly


def test_commands_connect_directly_while_no_keeper_answers(
    tmp_path: Path, ssh_hosts, keepers, monkeypatch
) -> None:
    """Another process holds the keeper's lock and serves nothing: the keeper a command
    starts gives way, and the command's hosts connect by themselves after one wait."""
    import fcntl

    project = persisting(make_project(tmp_path, ssh_hosts, {"app.txt": "v1\n"}), 30)
    path = keeper_socket(project, monkeypatch)
    assert path is not None
    with open(path.with_suffix(".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = project.deployer("setup")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # one keeper started and gave way; the 3 hosts did not each start and wait for one
    log = path.with_suffix(".log")
    assert log.read_text().count("another keeper serves") == 1
    assert keeper_pid(project, monkeypatch) is None
    for leftover in (log, path.with_suffix(".lock")):  # this test's own, kept by no keeper
        leftover.unlink()


# --- another local user ------------------------------------------------------------------

# Her client: she asks the keeper to stop (any answer at all would be one too many).
# Run by the system's python3: the venv's may live where she cannot go.
HER_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
    s.sendall(b'{"stop": true}\\n')
    reply = s.makefile("rb").readline()
except PermissionError:
    print("refused: permission denied")
except OSError:
    print("no answer")
else:
    print("answered: " + reply.decode().strip() if reply else "no answer")
"""


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An XDG_RUNTIME_DIR another user can pass through (pytest's tmp_path is root's
    alone): then only what the keeper itself does stands between her and its socket."""
    d = Path(tempfile.mkdtemp(prefix="deployer-rt-"))
    d.chmod(0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def a_keeper_in(
    runtime: Path, tmp_path: Path, ssh_hosts, keepers: list[int], monkeypatch
) -> tuple[Path, int]:
    """A keeper a command started, its socket in `runtime`: the socket and its pid."""
    project = persisting(make_project(tmp_path, ssh_hosts[:1], {"app.txt": "v1\n"}), 60)
    project.deployer("setup", check=True)
    path = keeper_socket(project, monkeypatch)
    assert path is not None and path.parent == runtime / "deployer"
    pid = keeper.pid_of(path)
    assert pid is not None
    keepers.append(pid)
    return path, pid


@needs_root
def test_the_keepers_socket_and_its_directory_are_its_users_alone(
    runtime: Path, tmp_path: Path, ssh_hosts, keepers, monkeypatch
) -> None:
    path, _ = a_keeper_in(runtime, tmp_path, ssh_hosts, keepers, monkeypatch)
    for where, is_kind, mode in ((path.parent, stat.S_ISDIR, 0o700), (path, stat.S_ISSOCK, 0o600)):
        st = os.lstat(where)
        assert is_kind(st.st_mode) and st.st_uid == os.getuid(), where
        assert stat.S_IMODE(st.st_mode) == mode, f"{where}: {stat.S_IMODE(st.st_mode):04o}"


@needs_root
@pytest.mark.parametrize(
    ("opened", "she_gets"),
    [
        (["socket"], "refused: permission denied"),  # the directory's mode alone
        (["directory"], "refused: permission denied"),  # the socket's mode alone
        (["directory", "socket"], "no answer"),  # the keeper's uid check (SO_PEERCRED) alone
    ],
    ids=["directory-mode-alone", "socket-mode-alone", "peer-uid-check-alone"],
)
def test_another_user_never_gets_the_keepers_sessions(
    runtime: Path,
    tmp_path: Path,
    ssh_hosts,
    keepers,
    monkeypatch,
    other: pwd.struct_passwd,
    opened: list[str],
    she_gets: str,
) -> None:
    """Each protection is tried alone: the others are opened up (as root) first, the
    one tried is left as the keeper made it."""
    path, pid = a_keeper_in(runtime, tmp_path, ssh_hosts, keepers, monkeypatch)
    if "directory" in opened:
        path.parent.chmod(0o755)
    if "socket" in opened:
        path.chmod(0o666)
    said = as_user(other, "/usr/bin/python3", "-c", HER_CLIENT, str(path)).stdout
    assert said == f"{she_gets}\n"
    assert keeper.pid_of(path) == pid  # her stop request did not stop it


def test_a_keeper_is_for_the_code_of_the_whole_package() -> None:
    """A change in a subpackage (the inventory's SSHConfig the keeper builds hosts
    from) makes another keeper, as one in a top-level module does."""
    files = {name for name, _mtime, _size in json.loads(keeper._code())[2]}
    assert {"keeper.py", "inventory/sections.py", "cli/base.py"} <= files
    assert not any("__pycache__" in name for name in files)
