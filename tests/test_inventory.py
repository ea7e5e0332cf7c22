"""Inventory: parsing, per-host expansion, validation messages, host selection."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deployer import inventory
from deployer.errors import HostSelectionError, InventoryError
from deployer.hostapi import options

REPO = Path(__file__).resolve().parent.parent

GOOD = """
[app]
name = "shop"
deploy_to = "/srv/{host}"

[master]
command = "node server.js"
listen = "{address}:3000"

[health]
url = "http://{address}:3000/health"

[hosts.web1]
address = "10.0.0.1"
[hosts.web2]
address = "10.0.0.2"
port = 2222
[hosts.web3]
address = "10.0.0.3"
[hosts.db1]
address = "10.0.1.1"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_inventory_loads_and_documents_every_key() -> None:
    inv = inventory.load(REPO / "inventory.example.toml")
    assert inv.app.name and inv.hosts
    text = (REPO / "inventory.example.toml").read_text()
    for section, cls in inventory.SECTIONS.items():
        assert f"[{section}]" in text
        for k in inventory.section_keys(cls):
            assert f"{k.name} =" in text or f"# {k.name} =" in text, f"[{section}] {k.name}"


def test_example_master_section_is_the_options_table() -> None:
    """The example's [master] is written from the table (options.example_lines())."""
    text = (REPO / "inventory.example.toml").read_text()
    section = text[text.index("[master]\n") : text.index("\n[health]")].rstrip("\n")
    assert section.splitlines() == options.example_lines()


def test_expansion_and_defaults(tmp_path: Path) -> None:
    inv = inventory.load(write(tmp_path, GOOD))
    web2 = inv.hosts["web2"]
    assert web2.app.deploy_to == "/srv/web2"
    assert web2.master.listen == "10.0.0.2:3000"
    assert web2.health.url == "http://10.0.0.2:3000/health"
    assert web2.port == 2222 and inv.hosts["web1"].port == 22
    assert inv.app.deploy_to == "/srv/{host}"  # the shared template stays unexpanded
    assert inv.rollout.batch == ("100%",) and inv.rollout.on_failure == "rollback"
    assert inv.master.workers == "auto" and inv.ssh.trust_new_hosts is False


def test_local_host_needs_no_address(tmp_path: Path) -> None:
    inv = inventory.load(
        write(
            tmp_path,
            """
            [app]
            name = "a"
            deploy_to = "/tmp/x/{host}"
            [hosts.here]
            transport = "local"
            """,
        )
    )
    assert inv.hosts["here"].address == "127.0.0.1"
    assert inv.hosts["here"].describe()["port"] is None


def test_env_var_names_the_inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOYER_INVENTORY", str(write(tmp_path, GOOD)))
    assert inventory.load().path.endswith("inventory.toml")


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (None, ["web1", "web2", "web3", "db1"]),
        ("web*", ["web1", "web2", "web3"]),
        ("web[12]", ["web1", "web2"]),
        ("web*,!web2", ["web1", "web3"]),
        ("!db*", ["web1", "web2", "web3"]),
        ("db1, web3", ["web3", "db1"]),
    ],
)
def test_select(tmp_path: Path, patterns: str | None, expected: list[str]) -> None:
    inv = inventory.load(write(tmp_path, GOOD))
    assert [h.name for h in inv.select(patterns)] == expected


@pytest.mark.parametrize("patterns", ["app*", "web1,wbe2", "web*,!web*"])
def test_select_nothing_is_an_error_listing_known_hosts(tmp_path: Path, patterns: str) -> None:
    inv = inventory.load(write(tmp_path, GOOD))
    with pytest.raises(HostSelectionError) as e:
        inv.select(patterns)
    assert "known hosts: web1, web2, web3, db1" in str(e.value)
    assert e.value.exit_code == 2


BASE = GOOD.replace("[hosts.web1]", "#").replace('address = "10.0.0.1"\n', "", 1)

# (case, toml text, fragments the message must contain)
BAD = [
    (
        "unknown key",
        GOOD + "\n[rollout]\nbatchh = 2\n",
        ["[rollout] batchh", "did you mean 'batch'"],
    ),
    ("unknown section", GOOD + "\n[apps]\nx = 1\n", ["top level apps", "did you mean 'app'"]),
    ("wrong type", GOOD.replace('name = "shop"', "name = 3"), ["[app] name", "non-empty string"]),
    ("bool for int", GOOD + "\n[rollout]\nparallel = true\n", ["[rollout] parallel", "integer"]),
    ("missing key", GOOD.replace('deploy_to = "/srv/{host}"', ""), ["[app] deploy_to", "required"]),
    ("missing section", GOOD.split("[master]")[1], ["[app]", "required section"]),
    ("port range", GOOD + "\n[ssh]\nport = 70000\n", ["[ssh] port", "<= 65535"]),
    ("batch 150%", GOOD + '\n[rollout]\nbatch = "150%"\n', ["[rollout] batch", "1% and 100%"]),
    ("ramp item", GOOD + '\n[rollout]\nbatch = [1, "x"]\n', ["[rollout] batch", "percentage"]),
    ("workers 0", GOOD.replace('listen = "', 'workers = 0\nlisten = "'), ["[master] workers"]),
    (
        "listen_fds 65",
        GOOD.replace('listen = "', 'listen_fds = 65\nlisten = "'),
        ["[master] listen_fds", "<= 64"],
    ),
    (
        "duplicate endpoint",
        GOOD + '\n[hosts.web4]\naddress = "10.0.0.1"\n',
        ["[hosts.web4]", "10.0.0.1:22", "[hosts.web1]", "duplicate address:port"],
    ),
    (
        "same port on one machine",
        GOOD.replace('listen = "{address}:3000"', 'listen = "127.0.0.1:3000"').replace(
            "[hosts.web1]",
            '[hosts.a]\ntransport = "local"\n[hosts.b]\ntransport = "local"\n[hosts.web1]',
        ),
        ["[hosts.b]", "listen 127.0.0.1:3000", "[hosts.a]"],
    ),
    (
        "bad bool",
        GOOD + '\n[ssh]\ntrust_new_hosts = "yes"\n',
        ["[ssh] trust_new_hosts", "true or false"],
    ),
    (
        "bad signal",
        GOOD.replace('listen = "', 'stop_signal = "SIGFOO"\nlisten = "'),
        ["[master] stop_signal"],
    ),
    (
        "bad choice",
        GOOD + '\n[rollout]\non_failure = "retry"\n',
        ["[rollout] on_failure", "'rollback'"],
    ),
    ("bad listen", GOOD.replace("{address}:3000", "nowhere"), ["[master] listen", "HOST:PORT"]),
    (
        "bad url",
        GOOD.replace("http://{address}:3000/health", "/health"),
        ["[health] url", "http://"],
    ),
    ("bad database", GOOD + '\n[migrations]\ndatabase = "mysql://x"\n', ["[migrations] database"]),
    (
        "bad migrations host",
        GOOD + '\n[migrations]\nhost = "web9"\n',
        ["[migrations] host", "'web9'"],
    ),
    ("host without address", GOOD + "\n[hosts.web5]\nport = 22\n", ["[hosts.web5] address"]),
    (
        "host unknown key",
        GOOD + '\n[hosts.web5]\naddress = "h"\nprot = 1\n',
        ["[hosts.web5] prot", "'port'"],
    ),
    ("no hosts", GOOD.split("[hosts.web1]")[0], ["[hosts]", "no hosts"]),
    ("not TOML", GOOD + "\n[app\n", ["not valid TOML"]),
    (
        "negative timeout",
        GOOD.replace("[health]\n", "[health]\ntimeout = -1\n"),
        ["[health] timeout"],
    ),
]


@pytest.mark.parametrize(("case", "text", "fragments"), BAD, ids=[c[0] for c in BAD])
def test_bad_inventory_names_the_key(
    tmp_path: Path, case: str, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as e:
        inventory.load(path)
    message = str(e.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in:\n{message}"


def test_reserved_names_are_refused_in_every_env_table(tmp_path: Path) -> None:
    """One list (hostapi.workerenv) for [env], a role's env and a host's env."""
    text = GOOD.replace("[hosts.web1]", '[env]\nLISTEN_FDS = "2"\nOK = "1"\n\n[hosts.web1]')
    text = text.replace('address = "10.0.0.3"\n', 'address = "10.0.0.3"\nroles = ["web"]\n')
    text += '[hosts.web2.env]\nNOTIFY_SOCKET = "/run/x"\n'
    text += '[roles.web.env]\nDEPLOYER_RELEASE = "x"\nLISTEN_FDNAMES = "y"\n'
    with pytest.raises(InventoryError) as e:
        inventory.load(write(tmp_path, text))
    message = str(e.value)
    for where in ("[env] LISTEN_FDS", "[hosts.web2.env] NOTIFY_SOCKET",
                  "[roles.web.env] LISTEN_FDNAMES"):  # fmt: skip
        assert f"{where}: set by the master for every worker; pick another name" in message
    assert "[roles.web.env] DEPLOYER_RELEASE: DEPLOYER_* names are deployer's own" in message
    assert "OK" not in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace('name = "shop"', "name = 3") + '\n[rollout]\nbatch = "0%"\ncanary = -1\n'
    with pytest.raises(InventoryError) as e:
        inventory.load(write(tmp_path, text))
    assert len(e.value.problems) == 3


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="file not found"):
        inventory.load(tmp_path / "nope.toml")
    with pytest.raises(InventoryError, match="is a directory"):
        inventory.load(tmp_path)


def test_cli_reports_bad_inventory_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + '\n[rollout]\nbatch = "150%"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(path), "hosts"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "[rollout] batch" in proc.stderr
    assert "Traceback" not in proc.stderr


HEALTH_APP = '[app]\nname = "shop"\ndeploy_to = "/srv/{host}"\n'


def test_health_url_by_a_host_name_that_is_another_address_is_refused(tmp_path: Path) -> None:
    # a host named by the IP it had before it moved: {host} now names web1's machine
    path = write(tmp_path, HEALTH_APP + '[health]\nurl = "http://{host}:3000/"\n'
                 '[hosts."10.0.0.2"]\naddress = "10.0.0.3"\n'
                 '[hosts.web1]\naddress = "10.0.0.2"\n')  # fmt: skip
    with pytest.raises(InventoryError) as e:
        inventory.load(path)
    assert e.value.problems == [
        "[hosts.10.0.0.2] [health] url: 'http://10.0.0.2:3000/' names host '10.0.0.2' "
        "([hosts.web1]), not 10.0.0.2 (address 10.0.0.3): the probe runs on 10.0.0.2 itself, "
        "so it would report 10.0.0.2's health as 10.0.0.2's; use {address} (or localhost, "
        "127.0.0.1)"
    ]
    # an IP as a name names that IP, whoever has it
    path.write_text(path.read_text().replace('address = "10.0.0.2"', 'address = "10.0.0.9"'))
    with pytest.raises(InventoryError, match=r"\[hosts.10.0.0.2\] \[health\] url: .*use \{address"):
        inventory.load(path)
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "-i", str(path), "hosts"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "[hosts.10.0.0.2] [health] url" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_health_url_naming_the_host_in_another_spelling_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, HEALTH_APP + '[health]\nurl = "http://{host}:3000/"\n'
                 '[hosts.web1]\naddress = "2001:db8::0:1"\n'
                 'health = {url = "http://[2001:DB8::1]:3000/"}\n'
                 '[hosts.web2]\naddress = "web2.example.com"\n'
                 'health = {url = "http://WEB2.example.com.:3000/"}\n'
                 '[hosts.web3]\naddress = "10.0.0.3"\n')  # fmt: skip
    hosts = inventory.load(path).hosts
    assert [h.health.url for h in hosts.values() if h.health] == [
        "http://[2001:DB8::1]:3000/", "http://WEB2.example.com.:3000/", "http://web3:3000/",
    ]  # fmt: skip


def test_a_host_overrides_master_and_health_keys(tmp_path: Path) -> None:
    inv = inventory.load(
        write(
            tmp_path,
            GOOD
            + """
[hosts.big]
address = "10.0.0.9"
[hosts.big.master]
workers = 8
stop_signal = "SIGQUIT"
[hosts.big.health]
passes = 5
""",
        )
    )
    big, web1 = inv.hosts["big"], inv.hosts["web1"]
    assert big.master is not None and web1.master is not None
    assert (big.master.workers, big.master.stop_signal.name) == (8, "SIGQUIT")
    assert web1.master.workers == "auto"
    assert big.master.listen == "10.0.0.9:3000"  # the rest from [master], expanded for it
    assert big.health is not None and big.health.passes == 5 and big.health.timeout == 30.0
    cfg = big.master_config()
    assert cfg is not None and "workers = 8\n" in options.to_toml(cfg)


def test_host_overrides_are_checked_where_they_are_written(tmp_path: Path) -> None:
    text = GOOD + '[hosts.big]\naddress = "10.0.0.9"\n[hosts.big.master]\nworkrs = 8\nworkers = 0\n'
    with pytest.raises(InventoryError) as e:
        inventory.load(write(tmp_path, text))
    message = str(e.value)
    assert "[hosts.big.master] workrs: unknown key (did you mean 'workers'?)" in message
    assert "[hosts.big.master] workers: expected a positive integer" in message
    alone = GOOD.replace("[master]", "[unused]", 1).split("[unused]")[0]
    alone += '[hosts.solo]\naddress = "10.0.0.8"\n[hosts.solo.master]\nworkers = 2\n'
    with pytest.raises(InventoryError) as e:
        inventory.load(write(tmp_path, alone))
    assert "[hosts.solo.master] command: required key is missing" in str(e.value)


def shipped_inventories() -> list[tuple[Path, str | None]]:
    """Every inventory the repository ships (inventory.example.toml, examples/*/), alone
    and with each stage overlay beside it (`<stem>.<stage>.toml`)."""
    bases = [REPO / "inventory.example.toml", *sorted((REPO / "examples").rglob("inventory.toml"))]
    found: list[tuple[Path, str | None]] = []
    for base in bases:
        found.append((base, None))
        for overlay in sorted(base.parent.glob(f"{base.stem}.*{base.suffix}")):
            found.append((base, overlay.name[len(base.stem) + 1 : -len(base.suffix)]))
    return found


def test_the_shipped_examples_include_a_stage() -> None:
    assert (REPO / "examples" / "shop" / "inventory.toml", "staging") in shipped_inventories()


@pytest.mark.parametrize(
    ("path", "stage"),
    shipped_inventories(),
    ids=lambda v: str(v.relative_to(REPO)) if isinstance(v, Path) else str(v),
)
def test_every_shipped_inventory_loads_as_is(path: Path, stage: str | None) -> None:
    """What the README and examples show works as written (issue 24.6h), the way a
    user runs it: `deployer -i PATH [-d STAGE] hosts`."""
    inv = inventory.load(path, stage)
    assert inv.hosts, path
    argv = [sys.executable, "-m", "deployer", "-i", str(path), *(["-d", stage] if stage else [])]
    proc = subprocess.run([*argv, "hosts"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in inv.hosts), proc.stdout


def test_reload_batch_is_a_count_or_a_share_of_the_workers(tmp_path: Path) -> None:
    from deployer.hostapi import checks

    assert checks.reload_batch(3) == 3 and checks.reload_batch("50%") == "50%"
    assert [checks.share_of(b, 4) for b in (1, "25%", "50%", "100%", "10%")] == [1, 1, 2, 4, 1]
    for bad in (0, "0%", "150%", "half", True, 2.5):
        with pytest.raises(checks.Invalid, match='or a percentage like "50%"'):
            checks.reload_batch(bad)
    with pytest.raises(InventoryError, match=r"\[master\] reload_batch: expected a positive"):
        inventory.load(
            write(tmp_path, GOOD.replace("[master]\n", '[master]\nreload_batch = "x"\n'))
        )
    # the default is not written into master.toml: an older master reads no "100%"
    cfg = inventory.load(write(tmp_path, GOOD)).hosts["web1"].master_config()
    assert cfg is not None and cfg.reload_batch == "100%"
    assert "reload_batch" not in options.to_toml(cfg)
