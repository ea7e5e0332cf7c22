"""The `deployer` command itself, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = str(REPO / "inventory.example.toml")


def deployer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deployer", *args], capture_output=True, text=True, env=env
    )


def test_help_and_version() -> None:
    proc = deployer("--help")
    assert proc.returncode == 0 and "hosts" in proc.stdout and "--inventory" in proc.stdout
    proc = deployer("--version")
    assert proc.returncode == 0 and "deployer, version" in proc.stdout


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom deployer.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY:' + ','.join(m for m in ('fabric','paramiko','git','rich') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "HEAVY:\n" in out or out.rstrip().endswith("HEAVY:")


def test_hosts_table_and_json() -> None:
    proc = deployer("-i", EXAMPLE, "hosts")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["name", "address", "port", "user", "transport"]
    assert lines[1].split() == ["web1", "10.0.0.11", "22", "deploy", "ssh"]
    proc = deployer("-i", EXAMPLE, "hosts", "--hosts", "web*,!web3", "--json")
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == ["web1", "web2"]
    assert rows[1] | {"deploy_to": None} == {
        "name": "web2",
        "address": "10.0.0.12",
        "port": 22,
        "user": "admin",
        "transport": "ssh",
        "deploy_to": None,
        "roles": [],  # no [roles]: the single implicit one
    }


def test_inventory_from_environment() -> None:
    import os

    proc = deployer("hosts", "--json", env={**os.environ, "DEPLOYER_INVENTORY": EXAMPLE})
    assert proc.returncode == 0 and "web3" in proc.stdout


def test_selection_error_exit_2_lists_hosts() -> None:
    proc = deployer("-i", EXAMPLE, "hosts", "--hosts", "db*")
    assert proc.returncode == 2
    assert "'db*' matches no host" in proc.stderr and "web1, web2, web3, local" in proc.stderr


def test_missing_inventory_and_bad_usage_exit_2() -> None:
    proc = deployer("-i", "/nonexistent/inventory.toml", "hosts")
    assert proc.returncode == 2 and "/nonexistent/inventory.toml" in proc.stderr
    proc = deployer("no-such-command")
    assert proc.returncode == 2 and "No such command" in proc.stderr
    proc = deployer("hosts", "--bogus-flag")
    assert proc.returncode == 2 and "--bogus-flag" in proc.stderr
    for p in (proc,):
        assert "Traceback" not in p.stderr


def test_master_keeps_the_double_dash_before_the_worker_command() -> None:
    """`deployer master run ... -- CMD ARGS`: the command after `--` reaches the master
    intact (click alone would swallow the `--`), with or without -i before `master`."""
    for prefix in ((), ("-i", EXAMPLE), (f"--inventory={EXAMPLE}",)):
        proc = deployer(*prefix, "master", "unit", "--listen", "127.0.0.1:8000", "--",
                        "node", "app.js", "--port", "3")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "-- node app.js --port 3" in proc.stdout
    bad = deployer("master", "run", "--workers", "0", "--", "true")
    assert bad.returncode == 2 and "--workers" in bad.stderr and "Traceback" not in bad.stderr
