"""The deploy server's install, as the README gives it: a fresh virtualenv, a
non-editable `pip install` of a checkout (a wheel is built from it), then the
installed `deployer` sets up a real sshd host, rolls out, pushes through the
installed git hooks, and reports status. A wheel once shipped without a file the
host agent is built from (the vendored tomli's LICENSE): `setup` then died."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from master_helpers import free_port
from rollout_helpers import APP, commit, git, make_project, master_extra, stop_masters
from sshd import SSHTestHost

from deployer import bundle

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def readme_install_line() -> str:
    """The install line of "Five minutes to a first `git push deploy main`"."""
    section = README.split("## Five minutes to a first", 1)[1]
    line = next(x for x in section.splitlines() if "pip install" in x)
    return line.split("#", 1)[0].strip()


def test_the_readme_installs_into_a_virtualenv_from_a_checkout() -> None:
    line = readme_install_line()
    assert re.fullmatch(
        r"python3 -m venv (\S+) && \1/bin/pip install /path/to/deployer-checkout", line
    ), line


def test_every_file_the_host_agent_is_built_from_is_package_data() -> None:
    """What the zipapp ships (hostapi/manifest.py) that is not Python must be named
    in pyproject.toml, or a wheel leaves it out (setuptools takes only .py files
    unless told)."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = data["tool"]["setuptools"]["package-data"]["deployer"]
    assert set(bundle.HOST_DATA) <= set(listed)


def test_a_missing_agent_file_is_a_clear_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deployer.hostapi import manifest

    monkeypatch.setattr(manifest, "HOST_DATA", ("_vendor/tomli/NO-SUCH-FILE",))
    with pytest.raises(bundle.IncompleteInstall, match="NO-SUCH-FILE: No such file"):
        manifest.sources()


def user_env() -> dict[str, str]:
    """The environment a user installs and runs in: nothing of this test run's Python."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


def checkout_copy(dest: Path) -> Path:
    """The files a clean clone has (tracked, and new ones not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's install line, run with a copy of this checkout as the path."""
    base = tmp_path_factory.mktemp("install")
    checkout = checkout_copy(base / "deployer-checkout")
    target = base / "venv"
    line = readme_install_line()
    venv_dir = re.match(r"python3 -m venv (\S+)", line).group(1)  # type: ignore[union-attr]
    command = line.replace(venv_dir, str(target)).replace(
        "/path/to/deployer-checkout", str(checkout)
    )
    proc = subprocess.run(
        ["sh", "-c", command], cwd=base, env=user_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(checkout)  # the install must not lean on the checkout it came from
    return target


def test_the_install_is_not_editable_and_has_the_agents_files(venv: Path) -> None:
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import deployer; print(deployer.__file__)"],
        capture_output=True, text=True, cwd="/", check=True, env=user_env(),
    ).stdout.strip()  # fmt: skip
    package = Path(where).parent
    assert package.is_relative_to(venv), where
    for name in bundle.HOST_DATA:
        assert (package / name).is_file(), name
    for hook in ("pre-receive", "post-update"):
        assert (venv / "share" / "deployer" / "hooks" / hook).is_file()


@pytest.fixture
def installed(venv: Path) -> Iterator[Path]:
    yield venv / "bin" / "deployer"


@pytest.mark.timeout(300)
def test_the_installed_deployer_sets_up_rolls_out_pushes_and_reports(
    installed: Path, tmp_path: Path, ssh_hosts: list[SSHTestHost]
) -> None:
    hosts = ssh_hosts[:1]
    port = free_port()
    project = make_project(tmp_path, hosts, {"app.py": APP}, extra=master_extra(port))
    env = user_env()
    env["DEPLOYER_STATE_DIR"] = str(project.state)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # no bundle facts cached by the checkout

    def run(*args: str, cwd: Path = project.repo) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(installed), "-i", str(project.inventory), *args],
            capture_output=True, text=True, cwd=cwd, env=env, timeout=240,
        )  # fmt: skip
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    try:
        setup = run("setup")
        assert setup.returncode == 0, setup.stdout + setup.stderr
        out = run("rollout")
        assert out.returncode == 0, out.stdout + out.stderr
        first = project.current(hosts[0])
        assert first is not None
        # the installed hooks: a push deploys through this install's python
        bare = tmp_path / "deploy.git"
        init = run("init", "--repo", str(bare))
        assert init.returncode == 0, init.stdout + init.stderr
        assert f"{installed.parent}/python" in (bare / "hooks" / "post-update").read_text()
        sha = commit(project.repo, {"VERSION": "2\n"}, "v2")
        git(project.repo, "remote", "add", "deploy", str(bare))
        push = subprocess.run(
            ["git", "-C", str(project.repo), "push", "deploy", "main"],
            capture_output=True, text=True, env=env, timeout=240,
        )  # fmt: skip
        assert push.returncode == 0, push.stdout + push.stderr
        assert project.revision(hosts[0]) == sha, push.stderr
        status = run("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert project.current(hosts[0]) in status.stdout
    finally:
        stop_masters(hosts)
