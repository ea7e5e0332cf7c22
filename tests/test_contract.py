"""The host contract without a network (like Kamal's command tests): the exact
argv of every agent call, the agent's own parser reading it back, every answer
round-tripped through its result line, master.toml and plans from inventories."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from deployer import inventory, migrating
from deployer import plan as planning
from deployer.agent.cli import _parser as agent_parser
from deployer.errors import BadInput
from deployer.hostapi import answers, calls, checks, options
from deployer.hostapi.layout import Layout, release_name
from deployer.remote import RemoteHost

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
LAYOUT = Layout.at("/srv/shop")
DIGEST = "0" * 64
OWNER = answers.LockOwner("abc123", "shop", "f" * 40, "rollout", "alice", "build1", 42, "t0")

# --- agent calls: exact argv -----------------------------------------------------------

CALLS = [
    (calls.version(), ["agent", "version"]),
    (calls.setup(), ["agent", "setup", "--root", "/srv/shop"]),
    (calls.state(), ["agent", "state", "--root", "/srv/shop"]),
    (
        calls.prepare("a" * 40, "20260101000000-aaaaaaa", ["config/x.env", "up/"], "make", True),
        [
            "agent", "prepare", "--root", "/srv/shop",
            "--revision", "a" * 40, "--release", "20260101000000-aaaaaaa",
            "--shared", "config/x.env", "--shared", "up/", "--build", "make", "--receive",
        ],
    ),
    (
        calls.prepare("a" * 40, "20260101000000-aaaaaaa"),
        [
            "agent", "prepare", "--root", "/srv/shop",
            "--revision", "a" * 40, "--release", "20260101000000-aaaaaaa",
        ],
    ),
    (
        calls.switch("20260101000000-aaaaaaa"),
        ["agent", "switch", "--root", "/srv/shop", "--release", "20260101000000-aaaaaaa"],
    ),
    (
        calls.switch("20260101000000-aaaaaaa", ["web", None]),
        [
            "agent", "switch", "--root", "/srv/shop", "--release", "20260101000000-aaaaaaa",
            "--for-role", "web", "--for-role", "",
        ],
    ),
    (calls.prune(5), ["agent", "prune", "--root", "/srv/shop", "--keep", "5"]),
    (
        calls.health("http://127.0.0.1:3000/health", 200, 30.0, 3, 0.5),
        [
            "agent", "health", "--url", "http://127.0.0.1:3000/health", "--expect", "200",
            "--timeout", "30.0", "--passes", "3", "--interval", "0.5",
        ],
    ),
    (
        calls.record({"id": "x", "result": "ok"}),
        ["agent", "record", "--root", "/srv/shop", "--entry", '{"id": "x", "result": "ok"}'],
    ),
    (
        calls.lock("release", OWNER, force=True),
        [
            "agent", "lock", "--root", "/srv/shop", "release", "--owner",
            json.dumps(OWNER.to_json(), sort_keys=True), "--force",
        ],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("call", "words"), CALLS, ids=[c[0].op for c in CALLS])
def test_agent_call_argv_is_exact(call: calls.AgentCall, words: list[str]) -> None:
    pyz = "/srv/shop/.deployer/deployer.pyz"
    argv = call.argv("python3", LAYOUT, DIGEST)
    assert argv == ["python3", "-c", calls.BOOTSTRAP, pyz, DIGEST, *words]


@pytest.mark.parametrize(("call", "words"), CALLS, ids=[c[0].op for c in CALLS])
def test_the_agent_parses_every_call(call: calls.AgentCall, words: list[str]) -> None:
    args = agent_parser().parse_args(call.argv("python3", LAYOUT, DIGEST)[6:])
    assert args.op == call.op
    if call.root:
        assert args.root == "/srv/shop"


def test_lock_owner_travels_as_json_without_force_inside() -> None:
    args = agent_parser().parse_args(calls.lock("acquire", OWNER).argv("p", LAYOUT, DIGEST)[6:])
    assert answers.LockOwner.from_json(json.loads(args.owner)) == OWNER
    assert "force" not in args.owner and args.force is False


def test_master_words() -> None:
    assert calls.master_start(LAYOUT) == ("master", "start", "--config", "/srv/shop/master.toml")
    reload = calls.master_reload("/srv/shop/run/master.sock", 95.0)
    assert reload == (
        "master", "reload", "--socket", "/srv/shop/run/master.sock", "--wait", "--timeout", "95.0"
    )  # fmt: skip
    assert calls.master_upgrade("/s", LAYOUT) == (
        "master", "upgrade", "--socket", "/s", "--code", "/srv/shop/.deployer/deployer.pyz"
    )  # fmt: skip
    assert calls.zipapp("python3", str(LAYOUT.pyz), DIGEST, *calls.master_stop("/s")) == [
        "python3", "-c", calls.BOOTSTRAP, "/srv/shop/.deployer/deployer.pyz", DIGEST,
        "master", "stop", "--socket", "/s",
    ]  # fmt: skip


# --- answers: round trips --------------------------------------------------------------

STATE = answers.HostState(
    root="/srv/shop",
    exists=True,
    current="20260101000000-aaaaaaa",
    current_revision="a" * 40,
    previous=None,
    releases=[answers.ReleaseInfo("20260101000000-aaaaaaa", "a" * 40)],
    have=["a" * 40],
    master=answers.MasterState(True, 4242, "/srv/shop/run/master.sock"),
    bundle="0.1.0+abc",
    cpus=2,
)
ANSWERS = [
    answers.Version("0.1.0", "0.1.0+abc", "3.9.18"),
    answers.SetupResult("/srv/shop", ["/srv/shop/releases"]),
    STATE,
    STATE._replace(master=answers.MasterState(False), current=None, releases=[]),
    answers.PrepareResult("20260101000000-aaaaaaa", "/srv/shop/releases/x", 1.5, 1234, "pack"),
    answers.SwitchResult(None, "20260101000000-aaaaaaa"),
    answers.SwitchResult(
        "20260101000000-aaaaaaa",
        "20260102000000-bbbbbbb",
        {"": answers.MasterState(True, 42, "/s/m.sock"), "worker": answers.MasterState(False)},
    ),
    answers.PruneResult(["20250101000000-bbbbbbb"], ["20260101000000-aaaaaaa"]),
    answers.HealthResult("http://x/health", 3, 200),
    answers.Recorded(),
    answers.LockAnswer(True),
    answers.LockAnswer(False, OWNER._replace(heartbeat=1700000000.5)),
    answers.LockAnswer(False, answers.LockOwner("")),
]


@pytest.mark.parametrize("answer", ANSWERS, ids=[type(a).__name__ for a in ANSWERS])
def test_every_answer_round_trips_through_its_result_line(answer: tuple) -> None:
    stdout = f"build: some output\n{answers.result_line(answer)}\n"
    assert answers.parse_result(stdout, type(answer)) == answer


def test_failed_and_missing_and_garbled_answers() -> None:
    with pytest.raises(answers.AgentFailed, match="disk full"):
        answers.parse_result(answers.result_line(error="disk full"), answers.SwitchResult)
    assert answers.parse_result("no result here\n", answers.SwitchResult) is None
    with pytest.raises(ValueError, match="not a JSON object"):
        answers.parse_result(f"{answers.RESULT_MARK} [1]", answers.SwitchResult)
    with pytest.raises(ValueError, match="unexpected answer"):
        answers.parse_result(f'{answers.RESULT_MARK} {{"ok": true}}', answers.SwitchResult)


def test_migration_rows_skip_everything_but_migration_events() -> None:
    out = "\n".join(
        [
            '{"event": "plan", "name": "x"}',
            "{not json",
            '{"event": "migration", "name": "0001_a", "phase": "expand", "state": "applied",'
            ' "release": "r1", "checksum": "c"}',
            "[1, 2]",
        ]
    )
    assert answers.migration_rows(out) == [
        answers.MigrationRow("0001_a", "expand", "applied", "r1")
    ]


# --- the master options table ----------------------------------------------------------


def test_master_toml_of_the_example_inventory() -> None:
    """Byte for byte tests/data/master.example.toml: what the version before the host
    contract wrote for this inventory (its deploy_to since moved out of /tmp)."""
    inv = inventory.load(REPO / "inventory.example.toml")
    written = "".join(
        f"### {h.name}\n" + options.to_toml(h.master_config()) for h in inv.hosts.values()
    )
    assert written == (DATA / "master.example.toml").read_text()


def test_master_toml_reads_back_as_the_same_config(tmp_path: Path) -> None:
    from deployer.master.config import load_file

    inv = inventory.load(REPO / "inventory.example.toml")
    cfg = inv.hosts["web1"].master_config()
    assert cfg is not None
    path = tmp_path / "master.toml"
    path.write_text(options.to_toml(cfg))
    back = options.build(load_file(str(path)))
    assert back == cfg.__class__(**{**cfg.__dict__, "command": tuple(cfg.argv)})


def test_every_option_is_a_flag_a_key_and_a_field() -> None:
    fields = set(options.MasterConfig.__dataclass_fields__)
    assert {o.key for o in options.OPTIONS} == fields
    from deployer.master.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = {a for action in run._actions for a in action.option_strings}
    assert {o.flag_name for o in options.FLAG_OPTIONS} <= flags


def test_config_round_trips_through_the_upgrade_state() -> None:
    cfg = options.build(
        {"command": "node app.js", "workers": 3, "ready": checks.ready("delay:1.5")},
        {"stop_signal": signal.SIGQUIT, "env": {"A": "1"}},
    )
    back = options.MasterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg.__class__(**{**cfg.__dict__, "command": tuple(cfg.argv)})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("workers", 0, "expected a positive integer"),
        ("workers", 10**12, "at most 1024"),
        ("ready_soak", float("nan"), "a number of seconds"),
        ("ready_timeout", float("inf"), "a number of seconds"),
        ("shutdown_timeout", -1, "a number of seconds >= 0"),
        ("listen", "a\0b:80", "a non-empty string"),
        ("stop_signal", "SIGKILL", "one of SIGTERM"),
        ("ready", "delay:x", "one of notify, pipe or delay:SECONDS"),
    ],
)
def test_master_option_checks(key: str, value: object, expected: str) -> None:
    with pytest.raises(options.ConfigError, match=expected):
        options.BY_KEY[key].parse(value, f"[master] {key}")


# --- plans from inventories ------------------------------------------------------------

INVENTORY = """
[app]
name = "shop"
deploy_to = "/srv/{host}"
[rollout]
batch = [1, "30%", "100%"]
canary = 1
max_failed = "25%"
"""


def _inventory(hosts: int, extra: str = "") -> inventory.Inventory:
    import tomllib

    text = INVENTORY + extra
    text += "".join(f'[hosts.web{i}]\naddress = "10.0.0.{i}"\n' for i in range(1, hosts + 1))
    return inventory.parse(tomllib.loads(text))


def test_batches_round_percentages_up() -> None:
    # 30% of 10 hosts is 3; of 11 hosts 3.3 -> 4 (rounded down it would be 3)
    assert planning.batch_size("30%", 10) == 3
    assert planning.batch_size("30%", 11) == 4
    assert planning.batch_size("1%", 3) == 1
    assert planning.split_batches(list("abcdefghijk"), 1, ["30%"]) == [
        ["a"], ["b", "c", "d", "e"], ["f", "g", "h", "i"], ["j", "k"]
    ]  # fmt: skip


def test_ramp_and_canary() -> None:
    names = [f"h{i}" for i in range(10)]
    assert planning.split_batches(names, 1, [1, "30%", "100%"]) == [
        ["h0"], ["h1"], ["h2", "h3", "h4"], ["h5", "h6", "h7", "h8", "h9"]
    ]  # fmt: skip
    assert planning.split_batches(names[:3], 0, [2]) == [["h0", "h1"], ["h2"]]
    assert planning.split_batches([], 1, [1]) == []


def test_allowed_failures_round_down() -> None:
    assert planning.allowed_failures("25%", 10) == 2
    assert planning.allowed_failures("25%", 3) == 0
    assert planning.allowed_failures(1, 3) == 1


def test_plan_rollout_from_an_inventory() -> None:
    inv = _inventory(7)
    sha = "0123456789abcdef0123456789abcdef01234567"
    plan = planning.plan_rollout(inv, list(inv.hosts), sha)
    release = next(iter(plan.targets.values()))
    assert release.endswith("-0123456") and set(plan.targets.values()) == {release}
    assert plan.batches == (("web1",), ("web2",), ("web3", "web4", "web5"), ("web6", "web7"))
    assert plan.max_failed == 1 and plan.on_failure == "rollback"
    text = plan.render()
    assert "switch canary batch: web1 -> " + release in text
    assert "hosts allowed to fail: 1" in text
    override = planning.plan_rollout(inv, list(inv.hosts), sha, batch=("50%",), canary=0)
    assert override.batches == (("web1", "web2", "web3", "web4"), ("web5", "web6", "web7"))


def _state(current: str | None, names: list[str], previous: str | None) -> answers.HostState:
    return STATE._replace(
        current=current,
        previous=previous,
        releases=[answers.ReleaseInfo(n, None) for n in names],
    )


def test_plan_rollback_goes_to_each_hosts_previous_release() -> None:
    inv = _inventory(2)
    states = {
        "web1": _state("r3", ["r1", "r2", "r3"], "r2"),
        "web2": _state("r3", ["r3"], None),
    }
    with pytest.raises(
        BadInput, match=r"nothing to roll back to on: web2 \(no release before r3\)"
    ):
        planning.plan_rollback(inv, states, None)
    states["web2"] = _state("r3", ["r1", "r3"], "r1")
    plan = planning.plan_rollback(inv, states, None)
    assert plan.targets == {"web1": "r2", "web2": "r1"}
    assert plan.on_failure == "halt" and plan.max_failed == 0
    with pytest.raises(BadInput, match=r"release r2 does not exist on: web2 \(has: r1, r3\)"):
        planning.plan_rollback(inv, states, "r2")


def test_check_rollback_refuses_to_pass_a_contract_migration() -> None:
    rows = [
        answers.MigrationRow("0001_add", "expand", "applied", "20260101000000-aaaaaaa"),
        answers.MigrationRow("0002_drop", "contract", "applied", "20260201000000-bbbbbbb"),
        answers.MigrationRow("0003_add", "expand", "applied", "20260301000000-ccccccc"),
    ]
    left = migrating.check_rollback(rows, "20260201000000-bbbbbbb", force=False)
    assert left == ["0003_add (expand, release 20260301000000-ccccccc)"]
    with pytest.raises(BadInput, match="oldest safe release is 20260201000000-bbbbbbb"):
        migrating.check_rollback(rows, "20260101000000-aaaaaaa", force=False)
    forced = migrating.check_rollback(rows, "20260101000000-aaaaaaa", force=True)
    assert [x.split()[0] for x in forced] == ["0002_drop", "0003_add"]


def test_release_names() -> None:
    import datetime as dt

    when = dt.datetime(2026, 12, 1, 10, 0, 5, tzinfo=dt.UTC)
    assert release_name("0123456789abcdef", when) == "20261201100005-0123456"
    with pytest.raises(ValueError, match="not a commit sha"):
        release_name("not-a-sha-at-all")
    with pytest.raises(ValueError, match="not a release name"):
        LAYOUT.release("../../etc")


def test_remote_host_builds_every_path_from_the_layout() -> None:
    inv = _inventory(1, '[master]\ncommand = "app"\nlisten = "{address}:80"\n')
    remote = RemoteHost(inv.hosts["web1"], transport=None)  # type: ignore[arg-type]
    assert remote.layout == Layout.at("/srv/web1")
    cfg = remote.master
    assert cfg is not None
    assert (cfg.cwd, cfg.socket, cfg.pidfile, cfg.log) == (
        "/srv/web1/current",
        "/srv/web1/run/master.sock",
        "/srv/web1/run/master.pid",
        "/srv/web1/log/master.log",
    )
    remote.cpus = 3
    # "auto" workers: the host's own CPU count (from its state), not a guess
    assert remote._master_timeout(None) == 3 * (60.0 + 0.5) + 30.0 + 30


def test_a_roles_files_are_named_after_it() -> None:
    layout = Layout.at("/srv/a", "worker")
    assert (layout.socket, layout.pidfile, layout.master_config, layout.master_log) == (
        Path("/srv/a/run/master-worker.sock"),
        Path("/srv/a/run/master-worker.pid"),
        Path("/srv/a/master-worker.toml"),
        Path("/srv/a/log/master-worker.log"),
    )
    assert layout.current == Layout.at("/srv/a").current  # one release for every role
    with pytest.raises(ValueError, match="not a role name"):
        Layout.at("/srv/a", "../x")
    assert calls.state("worker").words(Layout.at("/srv/a")) == [
        "state", "--root", "/srv/a", "--role", "worker",
    ]  # fmt: skip
    assert calls.watch(5.0, ["/s/a.sock", "/s/b.sock"], [("http://h/health", 200)]).args == (
        "--seconds", "5.0", "--socket", "/s/a.sock", "--socket", "/s/b.sock",
        "--url", "http://h/health", "--expect", "200",
    )  # fmt: skip
    # a look again: no wait, every crash of the 4.25 s since the host's switch counts
    assert calls.watch(0, ["/s/a.sock"], [], window=4.251).args == (
        "--seconds", "0", "--window", "4.25", "--socket", "/s/a.sock",
    )  # fmt: skip


def test_an_option_added_later_is_written_only_when_set() -> None:
    """So a master of the previous version still reads master.toml and the upgrade
    state of a config that does not use it (its parser knows no such key)."""
    plain = options.build({"command": ("app",), "listen": "127.0.0.1:1"})
    assert "nonblocking" not in options.to_toml(plain)
    assert "nonblocking" not in plain.to_dict()
    on = options.build({"command": ("app",), "nonblocking": True})
    assert "nonblocking = true\n" in options.to_toml(on)
    assert options.MasterConfig.from_dict(on.to_dict()).nonblocking is True
    assert options.MasterConfig.from_dict(plain.to_dict()).nonblocking is False
