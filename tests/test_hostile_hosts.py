"""Another local user on a host must not get the deploy user's (or root's) powers:
a deploy_to she could write is refused before anything is written, and the
zipapp runs only if it is the controller's own. Real sshd hosts, a real second
unix user."""

from __future__ import annotations

import io
import os
import pwd
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from rollout_helpers import Project, commit, git, make_repo
from sshd import SSHTestHost, inventory_toml
from users import OTHER, as_user, needs_root

pytestmark = needs_root


def project_at(tmp_path: Path, hosts: list[SSHTestHost], deploy_to: str) -> Project:
    repo = make_repo(tmp_path / "app", {"app.txt": "v1\n"})
    inventory = tmp_path / "inventory.toml"
    app = f'[app]\nname = "demo"\ndeploy_to = "{deploy_to}"\n'
    inventory.write_text(inventory_toml(hosts, app))
    return Project(repo, inventory, tmp_path / "state", hosts)


def shared_tmp(hosts: list[SSHTestHost]) -> Path:
    """A world-writable sticky directory like /tmp, beside the hosts' roots."""
    d = hosts[0].root.parent / "tmp"
    d.mkdir()
    d.chmod(0o1777)
    return d


def test_deploy_to_pre_created_by_another_user_is_refused(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], other: pwd.struct_passwd
) -> None:
    hosts = ssh_hosts[:1]
    tmp = shared_tmp(hosts)
    planted = tmp / hosts[0].name
    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o777)
    as_user(other, "mkdir", "-m", "0777", str(planted))
    as_user(other, "ln", "-s", str(victim), str(planted / "run"))
    as_user(other, "ln", "-s", str(victim), str(planted / "log"))
    before = sorted(os.listdir(planted))

    project = project_at(tmp_path, hosts, f"{tmp}/{{host}}")
    proc = project.deployer("setup")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{planted} is owned by {OTHER} (uid {other.pw_uid})" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    # nothing was written into her directory, nothing through her symlinks
    assert sorted(os.listdir(planted)) == before
    assert os.listdir(victim) == []
    # no agent was installed there, so every other command stops before writing
    for args in (["status"], ["rollout"], ["unlock"]):
        proc = project.deployer(*args)
        assert proc.returncode != 0 and "run `deployer setup`" in proc.stdout + proc.stderr
    assert sorted(os.listdir(planted)) == before and os.listdir(victim) == []


def test_deploy_to_she_owns_is_refused_even_if_nobody_else_may_write_it(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], other: pwd.struct_passwd
) -> None:
    """Hers, writable only by her and the deploy user's own group (0775, as an admin
    might hand it over): no mode check refuses it, only the owner check. Whoever owns
    deploy_to can chmod it and swap what the agent and the master write there."""
    hosts = ssh_hosts[:1]
    tmp = shared_tmp(hosts)
    hers = tmp / hosts[0].name
    hers.mkdir()
    os.chown(hers, other.pw_uid, pwd.getpwnam(hosts[0].user).pw_gid)
    hers.chmod(0o775)
    project = project_at(tmp_path, hosts, f"{tmp}/{{host}}")
    proc = project.deployer("setup")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{hers} is owned by {OTHER} (uid {other.pw_uid})" in proc.stdout
    assert os.listdir(hers) == []  # no layout made in her directory


def test_a_parent_another_user_owns_is_refused(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], other: pwd.struct_passwd
) -> None:
    hosts = ssh_hosts[:1]
    hers = hosts[0].root.parent / "hers"
    hers.mkdir()
    os.chown(hers, other.pw_uid, other.pw_gid)
    project = project_at(tmp_path, hosts, f"{hers}/apps/{{host}}")
    proc = project.deployer("setup")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        f"{hers} (above deploy_to {hers}/apps/{hosts[0].name}) is owned by {OTHER}" in proc.stdout
    )
    assert os.listdir(hers) == []  # not even the parents were created


def test_a_fresh_deploy_to_in_a_sticky_tmp_is_fine(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    hosts = ssh_hosts[:1]
    tmp = shared_tmp(hosts)
    project = project_at(tmp_path, hosts, f"{tmp}/{{host}}")
    out = project.deployer("setup", check=True).stdout
    root = tmp / hosts[0].name
    assert f"created {root}/releases" in out
    st = root.stat()
    assert st.st_uid == pwd.getpwnam(hosts[0].user).pw_uid and st.st_mode & 0o777 == 0o755
    again = project.deployer("setup", check=True).stdout
    assert "created" not in again and "up to date" in again


def test_a_symlink_or_a_writable_directory_in_the_layout_is_refused(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    hosts = ssh_hosts[:1]
    root = hosts[0].root
    project = project_at(tmp_path, hosts, str(root.parent / "{host}"))
    project.deployer("setup", check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "log").rmdir()
    (root / "log").symlink_to(elsewhere)
    proc = project.deployer("status")
    assert proc.returncode == 1
    assert f"{root}/log is a symlink (to {elsewhere}): a directory is expected" in proc.stdout
    (root / "log").unlink()
    (root / "log").mkdir()
    uid = pwd.getpwnam(hosts[0].user).pw_uid
    os.chown(root / "log", uid, uid)
    (root / "shared").chmod(0o777)
    proc = project.deployer("setup")
    assert proc.returncode == 2
    assert f"{root}/shared is writable by others (mode 0777): chmod go-w {root}/shared" in (
        proc.stdout
    )


def test_a_replaced_zipapp_never_runs(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> None:
    hosts = ssh_hosts[:1]
    root = hosts[0].root
    project = project_at(tmp_path, hosts, str(root.parent / "{host}"))
    project.deployer("setup", check=True)
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        code = f"open({str(marker)!r}, 'w').write('pwned')\n"
        z.writestr("__main__.py", code)
        z.writestr("deployer/__init__.py", code)
        z.writestr("deployer/hostmain.py", code + "def main():\n    return 0\n")
    pyz = root / ".deployer" / "deployer.pyz"
    pyz.write_bytes(buf.getvalue())  # same owner and mode: only the content differs
    for args in (["status"], ["rollout"]):
        proc = project.deployer(*args)
        assert proc.returncode != 0
        assert "is not this controller's (sha256 differs): run `deployer setup`" in proc.stdout
    assert not marker.exists()
    project.deployer("setup", check=True)
    status = project.deployer("status")  # runs again: only "no release" is wrong now
    assert status.returncode == 1 and "  - no release\n" in status.stdout, status.stdout


def test_shared_paths_never_pass_through_a_symlink_of_the_repo(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    hosts = ssh_hosts[:1]
    root = hosts[0].root
    # the deploy user's own files beside deploy_to: nothing but the check keeps the
    # agent (as that user) from replacing x.txt and deleting sub/ through the links
    outside = root.parent / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "x.txt").write_text("keep me\n")
    (outside / "sub" / "y.txt").write_text("keep me too\n")
    deploy = pwd.getpwnam(hosts[0].user)
    for path in (outside, outside / "sub", outside / "x.txt", outside / "sub" / "y.txt"):
        os.chown(path, deploy.pw_uid, deploy.pw_gid)
    project = project_at(tmp_path, hosts, str(root.parent / "{host}"))
    project.inventory.write_text(
        project.inventory.read_text().replace(
            "[app]\n", '[app]\nshared = ["conf/x.txt", "data/sub/"]\n', 1
        )
    )
    (project.repo / "conf").symlink_to(outside)
    (project.repo / "data").symlink_to(outside)
    git(project.repo, "add", "-A")
    git(project.repo, "commit", "-q", "-m", "hostile")
    project.deployer("setup", check=True)
    (root / "shared" / "conf").mkdir()
    (root / "shared" / "conf" / "x.txt").write_text("shared\n")
    proc = project.deployer("rollout")
    assert proc.returncode == 1
    assert f"conf is a symlink in the repository (to {outside})" in proc.stdout
    assert (outside / "x.txt").read_text() == "keep me\n" and not (outside / "x.txt").is_symlink()
    assert (outside / "sub" / "y.txt").read_text() == "keep me too\n"
    assert project.current(hosts[0]) is None


def test_the_database_password_is_on_no_command_line_and_in_no_message(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    hosts = ssh_hosts[:1]
    root = hosts[0].root
    secret = "S3cret-" + os.urandom(6).hex()
    # The hosts' python records every command line it is started with, as seen on
    # the host (what `ps` shows to every user), then runs.
    argv_log = root.parent / "argv.log"
    wrapper = root.parent / "python-recording"
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> {argv_log}\nexec python3 "$@"\n'
    )
    wrapper.chmod(0o755)
    argv_log.touch()
    argv_log.chmod(0o666)
    project = project_at(tmp_path, hosts, str(root.parent / "{host}"))
    text = project.inventory.read_text().replace(
        "[ssh]\n",
        f'[migrations]\ndatabase = "postgresql://app:{secret}@127.0.0.1:1/shop"\n\n'
        f'[ssh]\npython = "{wrapper}"\n',
        1,
    )
    project.inventory.write_text(text)
    commit(
        project.repo,
        {"migrations/20240101000000_add.sql": "-- phase: expand\n-- up\nCREATE TABLE t (a int);\n"},
        "migration",
    )
    project.deployer("setup", check=True)
    proc = project.deployer("rollout")
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert "postgresql://app:***@127.0.0.1:1/shop" in out
    places = {"output": out, "argv on the host": argv_log.read_text()}
    for path in [*project.state.rglob("*"), *root.rglob("*")]:
        if path.is_file() and not path.is_symlink() and path.suffix != ".pyz":
            places[str(path)] = path.read_text(errors="replace")
    assert "migrate" in places["argv on the host"]  # the runner did start there
    assert [where for where, text in places.items() if secret in text] == []


def test_the_master_never_writes_through_a_planted_log_symlink(tmp_path: Path) -> None:
    from master_helpers import PYTHON, PYTHON_APP, free_port, master_cli

    precious = tmp_path / "precious"
    precious.write_text("root only\n")
    log = tmp_path / "master.log"
    log.symlink_to(precious)
    r = master_cli(
        "start",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--log",
        str(log),
        "--pidfile",
        str(tmp_path / "master.pid"),
        "--",
        PYTHON,
        str(PYTHON_APP),
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert precious.read_text() == "root only\n"
    assert not (tmp_path / "master.pid").exists()


@pytest.mark.parametrize("entry", [".", "./", "a/../b", "/etc/x", "a//b"])
def test_the_agent_itself_refuses_a_shared_entry_outside_the_release(
    tmp_path: Path, entry: str
) -> None:
    """The inventory refuses these too; the agent does not rely on it."""
    from deployer.agent import ops
    from deployer.hostapi.layout import Layout

    layout = Layout.at(tmp_path / "root")
    release = tmp_path / "release"
    release.mkdir()
    (release / "keep").write_text("x")
    with pytest.raises(ops.AgentError, match="is not a relative path inside the release"):
        ops._link_shared(layout, release, [entry])
    assert (release / "keep").read_text() == "x" and not release.is_symlink()


def test_a_hidden_deploy_id_must_be_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "inventory.toml").write_text(
        '[app]\nname = "x"\ndeploy_to = "/srv/x"\n[hosts.a]\ntransport = "local"\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(tmp_path / "inventory.toml"), "rollout",
         "--deploy-id", "../../etc"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and "--deploy-id '../../etc': expected an id like" in r.stderr


def test_an_invalid_database_url_never_shows_its_password(tmp_path: Path) -> None:
    from deployer import inventory
    from deployer.errors import InventoryError

    text = (
        '[app]\nname = "x"\ndeploy_to = "/srv/x"\n[hosts.a]\ntransport = "local"\n'
        '[migrations]\ndatabase = "mysql://app:hunter2secret@db/shop"\n'
    )
    with pytest.raises(InventoryError) as e:
        inventory.parse(__import__("tomllib").loads(text))
    assert "mysql://app:***@db/shop" in str(e.value) and "hunter2secret" not in str(e.value)


def test_a_host_whose_sshd_has_no_sftp_subsystem_is_set_up_and_deployed(tmp_path: Path) -> None:
    """Nothing goes over SFTP: the zipapp travels on an exec channel's stdin."""
    from sshd import SSHDFleet

    class NoSFTP(SSHDFleet):
        def _config_text(self, server: object) -> str:
            text = super()._config_text(server)  # type: ignore[arg-type]
            assert "Subsystem sftp" in text
            return "".join(x for x in text.splitlines(True) if not x.startswith("Subsystem"))

    fleet = NoSFTP()
    try:
        hosts = fleet.fresh_copies(fleet.start(1), label="nosftp")
        project = project_at(tmp_path, hosts, str(hosts[0].root.parent / "{host}"))
        for args in (["setup"], ["rollout"], ["status"]):
            proc = project.deployer(*args)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        assert project.current(hosts[0]) is not None
    finally:
        fleet.cleanup()


# --- deploy hooks another local user controls (sshd's StrictModes) ---------------------


def write_hook(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho ran >> "{marker}"\n')
    path.chmod(0o755)
    return path


def test_deploy_hooks_another_user_controls_never_run(
    tmp_path: Path, other: pwd.struct_passwd
) -> None:
    """Each case has one defect, so each check alone stands between her and us."""
    from deployer import deploy_hooks
    from deployer.errors import BadInput

    said: list[str] = []
    inventory = tmp_path / "inventory.toml"
    hooks_dir = tmp_path / ".deployer" / "hooks"
    marker = tmp_path / "ran"
    hooks = deploy_hooks.DeployHooks(str(inventory), said.append, "rollout", "shop", None, ["h"])

    # owned by her (0755: only the owner check stops it)
    pre = write_hook(hooks_dir / "pre-deploy", marker)
    os.chown(pre, other.pw_uid, other.pw_gid)
    with pytest.raises(BadInput, match=f"owned by {OTHER}.*nothing was deployed"):
        hooks.pre_deploy()
    pre.unlink()
    # ours, but mode 0777 (only the mode check stops it)
    post = write_hook(hooks_dir / "post-deploy", marker)
    post.chmod(0o777)
    # a symlink to her file (only the target's owner check stops it)
    hers = tmp_path / "hers"
    hers.mkdir()
    target = write_hook(hers / "notify", marker)
    os.chown(target, other.pw_uid, other.pw_gid)
    (hooks_dir / "post-rollback").symlink_to(target)
    hooks.finished(True, False, 1.0)  # post-deploy
    hooks.finished(False, True, 1.0)  # post-rollback, on-failure (none)
    assert not marker.exists(), marker.read_text()
    warnings = [s for s in said if s.startswith("warning:")]
    assert (
        f"warning: hook post-deploy not run: hook post-deploy {post} is writable by others"
        f" (mode 0777): anyone could change what runs; chmod go-w {post}" in warnings
    ), said
    assert any(
        f"hook post-rollback {hooks_dir / 'post-rollback'} (a symlink to {target}) is owned by"
        f" {OTHER}" in w
        for w in warnings
    ), said

    # once fixed, each runs: a symlink to our own file is fine
    post.chmod(0o755)
    os.chown(target, 0, 0)
    said.clear()
    hooks.finished(True, False, 1.0)
    hooks.finished(False, True, 1.0)
    assert marker.read_text() == "ran\nran\n", said

    # a hooks directory others may write (only the directory check stops it)
    hooks_dir.chmod(0o777)
    write_hook(hooks_dir / "pre-deploy", marker)
    with pytest.raises(BadInput, match=f"{hooks_dir} .above hook pre-deploy .* is writable by"):
        hooks.pre_deploy()
    assert marker.read_text() == "ran\nran\n"


def test_a_pre_deploy_hook_she_owns_stops_the_rollout_before_any_host(
    tmp_path: Path, ssh_hosts: list[SSHTestHost], other: pwd.struct_passwd
) -> None:
    hosts = ssh_hosts[:1]
    project = project_at(tmp_path, hosts, f"{hosts[0].root.parent}/{{host}}")
    project.deployer("setup", check=True)
    marker = tmp_path / "ran"
    pre = write_hook(tmp_path / ".deployer" / "hooks" / "pre-deploy", marker)
    os.chown(pre, other.pw_uid, other.pw_gid)
    proc = project.deployer("rollout")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"hook pre-deploy {pre} is owned by {OTHER}" in proc.stderr, proc.stderr
    assert "nothing was deployed" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and project.current(hosts[0]) is None


def test_config_diff_never_reads_a_layout_file_through_a_symlink(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    """A master.toml that is a link to a file outside deploy_to (readable by the deploy
    user: root's files, with user = "root") is refused, not printed."""
    hosts = ssh_hosts[:1]
    project = project_at(tmp_path, hosts, f"{hosts[0].root.parent}/{{host}}")
    project.inventory.write_text(
        project.inventory.read_text().replace(
            "[app]\n", '[master]\ncommand = "python3 app.py"\nworkers = 1\n\n[app]\n', 1
        )
    )
    project.deployer("setup", check=True)
    toml = hosts[0].root / "master.toml"
    secret = hosts[0].root.parent / "not-deploy-to.toml"
    secret.write_text('[master]\nworkers = 7\ncommand = "SECRET-LINE"\n')
    toml.unlink()
    toml.symlink_to(secret)
    for args in (["config", "--diff"], ["config", "--diff", "--json"]):
        proc = project.deployer(*args)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert "SECRET-LINE" not in out and "workers = 7" not in out, out
        assert "Traceback" not in out
    said = project.deployer("config", "--diff").stdout
    assert f"{toml} is a symlink (to {secret}): not read" in said, said
    # setup replaces the link with a file of its own, leaving the target as it was
    setup = project.deployer("setup", check=True).stdout
    assert "SECRET-LINE" not in setup and not toml.is_symlink()
    assert "SECRET-LINE" in secret.read_text()
    assert project.deployer("config", "--diff").returncode == 0


def test_a_secrets_file_planted_as_a_link_is_refused(
    tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    """shared/.deployer-secrets.json as a link to another file of the deploy user's:
    its keys are never listed, nor handed to workers; `secrets set` writes nothing."""
    hosts = ssh_hosts[:1]
    project = project_at(tmp_path, hosts, f"{hosts[0].root.parent}/{{host}}")
    project.deployer("setup", check=True)
    secrets = hosts[0].root / "shared" / ".deployer-secrets.json"
    elsewhere = hosts[0].root.parent / "someone-elses.json"
    elsewhere.write_text('{"ELSEWHERE_KEY": "x"}')
    secrets.symlink_to(elsewhere)
    listed = project.deployer("secrets", "list")
    out = listed.stdout + listed.stderr
    assert listed.returncode != 0 and f"{secrets} is a symlink" in out, out
    assert "ELSEWHERE_KEY" not in out and "Traceback" not in out
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(project.inventory), "secrets", "set", "K"],
        input="v\n", capture_output=True, text=True, cwd=project.repo, timeout=60,
        env={**os.environ, "DEPLOYER_STATE_DIR": str(project.state)},
    )  # fmt: skip
    assert proc.returncode != 0 and "is a symlink" in proc.stdout + proc.stderr
    assert secrets.is_symlink() and elsewhere.read_text() == '{"ELSEWHERE_KEY": "x"}'
