"""Hosts as they are: the host side (agent, master, migrations runner) runs on
Python 3.9, `setup` refuses an older Python by name and version, and
`<deploy_to>/bin/deployer` serves an operator on the host.

The 3.9 interpreter is pyenv's, under /root, which the sshd hosts' login user
(`deployer-test`) cannot enter: so the 3.9 host is a `transport = "local"`
host (this machine, as root) whose `python` is that interpreter; the
over-SSH test of bin/deployer uses the sshd host's own python3.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from master_helpers import free_port
from rollout_helpers import APP, Project, commit, make_project, make_repo, master_extra
from rollout_helpers import stop_masters as stop_host_masters
from sshd import SSHTestHost

import deployer
from deployer.bundle import HOST_MODULES, HOST_PACKAGES, build
from deployer.hostapi import answers, calls
from deployer.hostapi.layout import Layout

PYENV = Path("/root/.pyenv/versions")
PY39 = PYENV / "3.9.18" / "bin" / "python3"
TOO_OLD = [PYENV / v / "bin" / exe for v, exe in (("3.8.18", "python3"), ("3.6.15", "python3"))]

needs_py39 = pytest.mark.skipif(
    not os.access(PY39, os.X_OK), reason=f"no Python 3.9 at {PY39} (pyenv)"
)

CREATE = {
    "migrations/20240101000000_create.sql": "-- phase: expand\n-- up\n"
    "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT);\n-- down\nDROP TABLE people;\n",
}
ADD_EMAIL = {
    "migrations/20240102000000_add_email.sql": "-- phase: expand\n-- up\n"
    "ALTER TABLE people ADD COLUMN email TEXT;\n-- down\nALTER TABLE people DROP COLUMN email;\n",
    # a Python migration, imported and run chunk by chunk by the runner on 3.9
    "migrations/20240102000100_fill_email.py": 'phase = "expand"\n\n\ndef up(db):\n'
    '    for lo, hi in db.batches("people", key="id", size=1):\n'
    '        db.execute("UPDATE people SET email = name WHERE id BETWEEN ? AND ?", (lo, hi))\n'
    "        yield hi\n\n\ndef down(db):\n    pass\n",
}


def host_modules() -> list[str]:
    """Every module the zipapp ships (deployer/bundle.py), by name."""
    root = Path(deployer.__file__).parent
    names = ["deployer"] + [f"deployer.{m[:-3]}" for m in HOST_MODULES if m != "__init__.py"]
    for pkg in HOST_PACKAGES:
        names.append(f"deployer.{pkg}")
        for info in pkgutil.walk_packages([str(root / pkg)], f"deployer.{pkg}."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return names


def test_host_modules_are_all_listed() -> None:
    """The import check below covers what is shipped: every host package, vendored code too."""
    names = host_modules()
    for must in ("deployer.hostmain", "deployer.agent.ops", "deployer.master.arbiter",
                 "deployer.migrations.runner", "deployer.hostapi.calls",
                 "deployer._vendor.tomli"):  # fmt: skip
        assert must in names
    for name in names:  # and they import here (the controller's Python)
        importlib.import_module(name)


@needs_py39
def test_every_host_module_imports_on_python39(tmp_path: Path) -> None:
    """Imported, not only compiled: a runtime `X | Y`, `datetime.UTC` or `tomllib`
    fails at import, not at compile time. From the zipapp itself, as on a host."""
    pyz = tmp_path / "deployer.pyz"
    pyz.write_bytes(build().data)
    script = (
        "import importlib, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "bad = []\n"
        "for name in sys.argv[2:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append('%s: %s: %s' % (name, type(e).__name__, e))\n"
        "print('\\n'.join(bad))\n"
        "print(sys.version.split()[0])\n"
    )
    proc = subprocess.run(
        [str(PY39), "-I", "-c", script, str(pyz), *host_modules()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    *failures, version = proc.stdout.strip().split("\n")
    assert version.startswith("3.9.")
    assert [f for f in failures if f] == []


@needs_py39
def test_master_toml_is_read_on_python39_without_tomllib(tmp_path: Path) -> None:
    """Python 3.9 has no tomllib: the vendored tomli reads master.toml."""
    pyz = tmp_path / "deployer.pyz"
    pyz.write_bytes(build().data)
    toml = tmp_path / "master.toml"
    toml.write_text('[master]\ncommand = "python3 app.py"\nworkers = 3\nsocket = "run/m.sock"\n')
    script = (
        "import sys\nsys.path.insert(0, sys.argv[1])\n"
        "from deployer.master.config import load_file\n"
        "print(sorted(load_file(sys.argv[2]).items()))\n"
    )
    proc = subprocess.run(
        [str(PY39), "-I", "-c", script, str(pyz), str(toml)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "('workers', 3)" in proc.stdout and f"{tmp_path}/run/m.sock" in proc.stdout


# --- a real rollout against a host whose Python is 3.9 --------------------------------


def local_project(tmp_path: Path, python: Path, extra: str = "") -> Project:
    """A project with one `transport = "local"` host whose host side runs on `python`."""
    repo = make_repo(tmp_path / "app", {"app.py": APP, **CREATE})
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(
        f'[app]\nname = "demo"\ndeploy_to = "{tmp_path}/host"\n{extra}\n'
        '[migrations]\ndatabase = "sqlite:///app.sqlite3"\n\n'
        f'[hosts.web1]\ntransport = "local"\npython = "{python}"\n'
    )
    return Project(repo, inventory, tmp_path / "state", [])


def columns(root: Path) -> list[str]:
    db = sqlite3.connect(root / "shared" / "app.sqlite3")
    try:
        return [r[1] for r in db.execute("PRAGMA table_info(people)")]
    finally:
        db.close()


def rows(root: Path) -> list[tuple[str, str]]:
    db = sqlite3.connect(root / "shared" / "app.sqlite3")
    try:
        return db.execute("SELECT name, email FROM people ORDER BY id").fetchall()
    finally:
        db.close()


def stop_master(root: Path) -> None:
    stop_host_masters([SimpleNamespace(root=root)])  # by the pid in its pidfile


def agent_version(python: Path, root: Path) -> answers.Version:
    argv = calls.version().argv(str(python), Layout.at(root), build().sha256)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    answer = answers.parse_result(proc.stdout, answers.Version)
    assert answer is not None, proc.stdout + proc.stderr
    return answer


@pytest.fixture
def py39_project(tmp_path: Path) -> Iterator[Project]:
    project = local_project(tmp_path, PY39, master_extra(free_port()))
    try:
        yield project
    finally:
        stop_master(tmp_path / "host")


@needs_py39
def test_setup_rollout_reload_rollback_and_migrate_on_python39(py39_project: Project) -> None:
    p, root = py39_project, py39_project.inventory.parent / "host"
    layout = Layout.at(root)
    p.deployer("setup", check=True)
    version = agent_version(PY39, root)
    assert version.python.startswith("3.9."), version
    assert version.bundle == build().id
    # bin/deployer runs the installed zipapp with the Python that ran setup
    wrapper = layout.wrapper
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    assert f"py={PY39}\n" in wrapper.read_text()

    v1_out = p.deployer("rollout", check=True).stdout  # prepare, expand migration, master start
    v1 = p.current(SimpleNamespace(root=root))
    pid = int(layout.pidfile.read_text())
    assert os.path.realpath(f"/proc/{pid}/exe").endswith("python3.9"), v1_out
    db = sqlite3.connect(root / "shared" / "app.sqlite3")
    with db:
        db.executemany("INSERT INTO people (name) VALUES (?)", [("ada",), ("bob",)])
    db.close()

    commit(p.repo, {"app.py": APP + "\n# v2\n", **ADD_EMAIL}, "v2")
    p.deployer("rollout", check=True)  # the master (3.9) reloads its workers onto v2
    v2 = p.current(SimpleNamespace(root=root))
    assert v2 != v1 and int(layout.pidfile.read_text()) == pid

    # the operator's view on the host: bin/deployer finds the socket in master.toml
    reload = subprocess.run([str(wrapper), "master", "reload", "--wait"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert reload.stdout.rstrip().endswith(f"/releases/{v2}"), reload.stdout
    status = subprocess.run([str(wrapper), "master", "status"], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert f"master pid {pid} " in status.stdout and "workers: 2 ready of 2" in status.stdout
    upgrade = subprocess.run([str(wrapper), "master", "upgrade"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert f"master pid {pid} upgraded in place" in upgrade.stdout  # re-exec'd on 3.9
    assert os.path.realpath(f"/proc/{pid}/exe").endswith("python3.9")

    migrations = p.deployer("migrate", "status", check=True).stdout
    assert "20240101000000_create" in migrations and "20240102000000_add_email" in migrations
    assert "3 applied" in migrations and columns(root) == ["id", "name", "email"]
    assert rows(root) == [("ada", "ada"), ("bob", "bob")]
    assert "web1" in p.deployer("status", check=True).stdout  # the agent's state op

    p.deployer("rollback", "--migrations", check=True)  # back to v1, expand down on 3.9
    assert p.current(SimpleNamespace(root=root)) == v1
    assert int(layout.pidfile.read_text()) == pid
    after = p.deployer("migrate", "status", check=True).stdout
    assert "20240102000000_add_email" not in after and "1 applied" in after, after
    assert columns(root) == ["id", "name"]  # its down section ran, on 3.9
    health = subprocess.run([str(wrapper), "master", "status", "--json"],
                            capture_output=True, text=True)  # fmt: skip
    assert health.returncode == 0 and v1 in health.stdout


@pytest.mark.parametrize("python", TOO_OLD, ids=lambda p: p.parent.parent.name)
def test_setup_refuses_a_python_older_than_39_by_name_and_version(
    tmp_path: Path, python: Path
) -> None:
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python} (pyenv)")
    version = python.parent.parent.name
    p = local_project(tmp_path, python)
    proc = p.deployer("setup")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"{python} is {version}" in out and "needs Python 3.9 or later" in out, out
    assert not (tmp_path / "host").exists()  # refused before anything was written


# --- bin/deployer over real SSH -----------------------------------------------------------


@pytest.fixture
def ssh_project(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> Iterator[Project]:
    hosts = ssh_hosts[:1]
    project = make_project(tmp_path, hosts, {"app.py": APP}, extra=master_extra(free_port()))
    try:
        yield project
    finally:
        stop_host_masters(hosts)


def test_bin_deployer_master_status_over_ssh(ssh_project: Project) -> None:
    """`ssh host <deploy_to>/bin/deployer master status`: no --socket needed."""
    p, host = ssh_project, ssh_project.hosts[0]
    p.deployer("setup", check=True)
    p.deployer("rollout", check=True)
    layout = Layout.at(host.root)
    st = layout.wrapper.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == os.stat(host.root).st_uid
    assert stat.S_IMODE(layout.bin.stat().st_mode) == 0o755
    pid = int(layout.pidfile.read_text())

    proc = subprocess.run(host.ssh_argv(f"{layout.wrapper} master status"),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"master pid {pid} " in proc.stdout
    assert f"/releases/{p.current(host)} " in proc.stdout and "workers: 2 ready of 2" in proc.stdout
    # the explicit form still works, and anything else goes to the zipapp as it is
    explicit = subprocess.run(
        host.ssh_argv(f"{layout.wrapper} master status --json --socket {layout.socket}"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert explicit.returncode == 0 and f'"pid": {pid}' in explicit.stdout, explicit.stderr
    usage = subprocess.run(host.ssh_argv(f"{layout.wrapper} nonsense"),
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert usage.returncode == 2 and "usage: deployer.pyz" in usage.stderr
