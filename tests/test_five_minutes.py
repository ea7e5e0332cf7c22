"""README's "Five minutes to a first `git push deploy main`", followed as written.

Its shell blocks are taken from the README and run with only what a test machine
must change substituted: the hosts' addresses and ports (two sshd hosts on
loopback), where their deploy_to lives, and the deploy server's host name. The
deploy server is this machine reached over ssh as the hosts' login user (the
"deploy" account: a dedicated unix user with an empty home); its commands run as
that user, from an empty directory; the push goes over `ssh://` with real git.
Each host's deploy user and deploy_to (the README's first block, run as root on a
host) are what the sshd fixture gives every test host."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from master_helpers import free_port
from rollout_helpers import commit, make_repo, stop_masters
from sshd import SSHTestHost, inventory_toml
from test_install import checkout_copy

REPO = Path(__file__).resolve().parent.parent
SECTION = (REPO / "README.md").read_text().split("## Five minutes to a first", 1)[1]
SECTION = SECTION.split("\n## ", 1)[0]
BLOCKS = re.findall(r"```sh\n(.*?)```", SECTION, re.S)
SERVER_JS = (REPO / "examples" / "node-app" / "app.js").read_text()
PACKAGE = {"name": "shop", "version": "1.0.0", "private": True}
LOCK = {
    "name": "shop", "version": "1.0.0", "lockfileVersion": 3, "requires": True,
    "packages": {"": {"name": "shop", "version": "1.0.0"}},
}  # fmt: skip

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs the deploy server as another user"),
    pytest.mark.skipif(shutil.which("node") is None, reason="the README's app is a Node app"),
]


def test_the_section_has_the_blocks_this_test_runs() -> None:
    host, server, app, after = BLOCKS
    assert "install -d -o deploy -g deploy /srv/shop" in host
    assert server.startswith("python3 -m venv ~/deployer && ~/deployer/bin/pip install ")
    assert "deployer init --repo ~/shop.git" in server
    assert app.splitlines() == [
        "git remote add deploy ssh://deploy@deploy.example.com/~/shop.git",
        "git push deploy main",
    ]
    assert after.splitlines()[0].startswith("deployer status")


def as_deploy_user(home: Path, user: pwd.struct_passwd) -> dict[str, object]:
    """subprocess arguments that run a command as the deploy account, in `home`."""
    env = {"HOME": str(home), "USER": user.pw_name, "LOGNAME": user.pw_name,
           "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}  # fmt: skip
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env,
            "cwd": home}  # fmt: skip


@pytest.mark.timeout(600)
def test_five_minutes_as_written(tmp_path: Path, ssh_hosts: list[SSHTestHost]) -> None:
    hosts = ssh_hosts[:2]
    deploy = pwd.getpwnam(hosts[0].user)
    port = free_port()
    # the deploy server: an empty home of the deploy account, with its SSH key
    home = hosts[0].root.parent / "deploy-server"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(hosts[0].identity, home / ".ssh" / "id_ed25519")
    shutil.copy(hosts[0].known_hosts, home / ".ssh" / "known_hosts")
    checkout = checkout_copy(home / "deployer-checkout")
    for path in [home, *home.rglob("*")]:
        os.chown(path, deploy.pw_uid, deploy.pw_gid, follow_symlinks=False)
    (home / ".ssh" / "id_ed25519").chmod(0o600)

    _, server, app, after = BLOCKS
    roots = hosts[0].root.parent
    ours = inventory_toml(hosts).replace(str(hosts[0].identity), str(home / ".ssh/id_ed25519"))
    ours = ours.replace(str(hosts[0].known_hosts), str(home / ".ssh/known_hosts"))
    tail = server[server.index("[ssh]\n") : server.index("TOML\n", server.index("[ssh]"))]
    script = (
        server.replace("/path/to/deployer-checkout", str(checkout))
        .replace('deploy_to = "/srv/shop"', f'deploy_to = "{roots}/{{host}}"')
        .replace(":3000", f":{port}")
        .replace(tail, ours + "\n")
    )
    print(f"--- the deploy server's commands, as run ---\n{script}")
    ran = subprocess.run(
        ["sh", "-ec", script], input="postgresql://shop:s3cret@db1/shop\n", text=True,
        capture_output=True, timeout=480, **as_deploy_user(home, deploy),  # type: ignore[arg-type]
    )  # fmt: skip
    print(ran.stdout[-6000:], ran.stderr[-3000:])
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    assert "git remote add deploy ssh://" in ran.stdout  # init's advice
    assert (home / "shop.git" / "hooks" / "post-update").is_file()

    # the app's repository, on the developer's machine (root here), pushed over ssh
    try:
        repo = make_repo(tmp_path / "shop", {
            "server.js": SERVER_JS, "package.json": json.dumps(PACKAGE),
            "package-lock.json": json.dumps(LOCK),
        })  # fmt: skip
        server_host = hosts[0]
        # `~` is the deploy account's home: here the test's, not its passwd entry's
        url = f"ssh://{deploy.pw_name}@{server_host.address}:{server_host.port}{home}/shop.git"
        ssh = (
            f"ssh -i {server_host.identity} -o UserKnownHostsFile={server_host.known_hosts}"
            " -o IdentitiesOnly=yes -o BatchMode=yes"
        )
        env = {**os.environ, "GIT_SSH_COMMAND": ssh}
        for line in app.splitlines():
            line = line.replace("ssh://deploy@deploy.example.com/~/shop.git", url)
            proc = subprocess.run(
                line, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=300
            )
            print(f"$ {line}\n{proc.stdout}{proc.stderr[-6000:]}")
            assert proc.returncode == 0, proc.stderr[-4000:]
        assert "deployer: verdict: ok (exit 0)" in proc.stderr
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
        for h in hosts:
            assert (h.root / "current" / "REVISION").read_text().strip() == sha
        # then, on the deploy server in ~/shop: status, history, logs -f
        for line in after.splitlines():
            command = line.split("#", 1)[0].strip()
            if command == "deployer rollback":  # from the second deploy on
                commit(repo, {"VERSION": "2\n"}, "v2")
                subprocess.run(["git", "-C", str(repo), "push", "deploy", "main"],
                               env=env, capture_output=True, check=True, timeout=300)  # fmt: skip
            proc = subprocess.run(
                f"export PATH=~/deployer/bin:$PATH && cd ~/shop && {command}", shell=True,
                capture_output=True, text=True, timeout=300, **as_deploy_user(home, deploy),  # type: ignore[arg-type]
            )  # fmt: skip
            print(f"$ {command}\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for h in hosts:
            assert (h.root / "current" / "REVISION").read_text().strip() == sha  # rolled back
    finally:
        stop_masters(hosts)
