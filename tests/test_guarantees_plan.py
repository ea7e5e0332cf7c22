"""The rollout and rollback decisions without a network: which host goes where,
in which order, and what is left where after a failure.

The fleet is a set of fake hosts that keep only the state a decision reads and
changes (the release `current` points to, the releases present, a lock) and
answer health by a rule the test gives. The real execution code runs on them
(`run_rollout`, `run_rollback`, FleetSession.each's failure handling, FleetLocks),
so these tests are fast enough for mutation testing; the same promises are
checked on real sshd hosts in test_guarantees_rollout.py.
"""

from __future__ import annotations

import os
import socket
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from deployer import inventory, lock, migrating, rollout
from deployer import plan as planning
from deployer.errors import BadInput, LockHeld, StepFailed
from deployer.hostapi import answers
from deployer.hostapi.layout import Layout, release_name
from deployer.report import Reporter
from deployer.session import FleetSession

OLD = "20260101000000-aaaaaaa"
SHA = "b" * 40
NEW = release_name(SHA)
BUNDLE = "0.1.0+test"


class FakeHost:
    """One host: its releases, `current`, a lock; health decided by `world.healthy`."""

    def __init__(self, world: World, name: str, config: inventory.HostConfig) -> None:
        self.world = world
        self.name = name
        self.config = config
        self.layout = Layout.at(f"/srv/{name}")
        self.current: str | None = OLD
        self.releases = [OLD]
        self.holder: answers.LockOwner | None = None
        self.master_running = False
        self.recorded: list[dict[str, Any]] = []
        self.pruned = False

    # the RemoteHost calls the rollout makes
    def state(self, role: str | None = None) -> answers.HostState:
        previous = [r for r in self.releases if self.current and r < self.current]
        return answers.HostState(
            root=str(self.layout.root),
            exists=True,
            current=self.current,
            current_revision=None,
            previous=previous[-1] if previous else None,
            releases=[answers.ReleaseInfo(r, None) for r in self.releases],
            have=["c" * 40],
            master=answers.MasterState(self.master_running),
            bundle=BUNDLE,
        )

    def prepare(self, revision: str, release: str, pack: Any, on_line: Callable) -> None:
        assert (revision, release, pack) == (SHA, NEW, b"pack"), (revision, release, pack)
        self.world.log.append(("prepare", self.name))
        if self.name in self.world.prepare_fails:
            raise StepFailed(self.name, "prepare", "build exited with 3")
        self.releases.append(release)

    def switch(self, release: str, roles: Sequence[str | None] = ()) -> answers.SwitchResult:
        self.world.log.append(("switch", self.name, release))
        if (self.name, release) in self.world.switch_fails:
            raise StepFailed(self.name, "switch", "disk full")
        previous, self.current = self.current, release
        masters = {r or "": answers.MasterState(self.master_running) for r in roles}
        return answers.SwitchResult(previous, release, masters)

    def health(self, role: str | None = None) -> answers.HealthResult:
        self.world.log.append(("health", self.name, self.current))
        if self.world.interrupt == (self.name, self.current):
            # Ctrl-C (or SIGTERM, which the CLI turns into the same) while this host is
            # checked: fleet.each hands it on to the rollout once the batch has ended.
            raise KeyboardInterrupt
        if not self.world.healthy(self.name, self.current):
            raise StepFailed(self.name, "health", "got 503, expected 200")
        return answers.HealthResult("http://x/health", 1, 200)

    def watch(self, seconds: float, window: float = 0.0) -> answers.WatchResult:
        self.world.log.append(("watch", self.name, seconds))
        if (self.name, self.current) in self.world.watch_fails:
            raise StepFailed(self.name, "watch", "worker 1 crashed (exited with code 3)")
        return answers.WatchResult(seconds, 1, 1)

    def start_master(self, on_line: Callable, role: str | None = None) -> None:
        self.world.log.append(("start master", self.name))
        self.master_running = True

    @property
    def master(self) -> Any:
        return self.config.master_config()

    def master_for(self, role: str | None) -> Any:
        return self.config.master_config(role)

    cpus = 2

    def call(self, call: Any) -> Any:
        """Only the unit call goes through here (the rollout's first start)."""
        assert call.op == "unit", call
        self.world.log.append(("unit", self.name))
        return answers.UnitResult("auto", boot="no systemd on this host")

    def reload_master(self, on_line: Callable, role: str | None = None) -> None:
        self.world.log.append(("reload master", self.name))

    def record(self, entry: dict[str, Any]) -> None:
        self.recorded.append(entry)

    def prune(self) -> None:
        self.pruned = True

    def lock(
        self,
        action: str,
        owner: answers.LockOwner,
        force: bool = False,
        take_stale: float | None = None,
        replace: str | None = None,
    ) -> Any:
        assert action in ("acquire", "heartbeat", "release", "show"), action
        assert isinstance(owner, answers.LockOwner), owner
        self.world.log.append(("lock", self.name, action, force))
        if action == "acquire":
            self.world.owners.append(owner)
        if self.name in self.world.lock_fails:
            raise StepFailed(self.name, "lock", "cannot connect")
        if action == "acquire":
            held = self.holder
            if held is not None:
                beat = held.heartbeat
                stale = (
                    take_stale is not None and beat is not None and time.time() - beat > take_stale
                )
                if not stale and held.id != replace:
                    return answers.LockAnswer(False, held)
            self.holder = owner
            return answers.LockAnswer(True, held)
        if action == "release" and self.holder is not None:
            if force or self.holder.id == owner.id:
                self.holder = None
                return answers.LockAnswer(True)
            return answers.LockAnswer(False, self.holder)
        if action == "heartbeat":
            self.world.heartbeats.append(self.name)
        return answers.LockAnswer(False, self.holder)

    @property
    def locked(self) -> bool:
        return self.holder is not None

    def migrate(
        self, words: tuple[str, ...], cwd: str, on_line: Callable | None = None, **kw: Any
    ) -> Any:
        assert words[0] == "migrate" and words[-2:] == ("--database", "-"), words
        args = words[1:-2]  # the command and its arguments, as calls.migrate* built them
        self.world.log.append(("migrate", *args))
        self.world.migrate_kw.append(
            {"cwd": cwd, **kw, **({"on_line": on_line} if on_line else {})}
        )
        if self.world.migrate_fails and self.world.migrate_fails in args:
            raise StepFailed(self.name, "migrations", "no such table")
        return type("Result", (), {"stdout": self.world.migrate_stdout, "exit_code": 0,
                                   "stderr": "warned"})()  # fmt: skip


class Source:
    def resolve(self, revision: str | None) -> str:
        assert revision == SHA, revision
        return "resolved-" + revision


class World:
    """The fleet as a FleetSession sees it, with fake hosts."""

    def __init__(self, tmp_path: Path, hosts: int, extra: str = "") -> None:
        text = '[app]\nname = "shop"\ndeploy_to = "/srv/{host}"\n' + extra
        text += "".join(f'[hosts.web{i}]\naddress = "10.0.0.{i}"\n' for i in range(1, hosts + 1))
        self.inventory = inventory.parse(tomllib.loads(text))
        self.log: list[tuple] = []
        self.healthy: Callable[[str, str | None], bool] = lambda host, release: True
        self.prepare_fails: set[str] = set()
        self.migrate_fails: str | None = None
        self.interrupt: tuple[str, str] | None = None
        self.watch_fails: set[tuple[str, str]] = set()
        self.lock_fails: set[str] = set()
        self.owners: list[answers.LockOwner] = []
        self.packed: list[tuple] = []
        self.switch_fails: set[tuple[str, str]] = set()
        self.heartbeats: list[str] = []
        self.migrate_stdout = ""
        self.migrate_kw: list[dict[str, Any]] = []
        quiet = Reporter(open(os.devnull, "w"))  # noqa: SIM115
        self.fleet = FleetSession(self.inventory, [], tmp_path / "state", quiet)
        self.fleet.remote = lambda name: self.hosts[name]  # a host outside the selection
        self.hosts = {n: FakeHost(self, n, c) for n, c in self.inventory.hosts.items()}
        self.fleet.remotes = self.hosts  # type: ignore[assignment]

    def rollout(self, **kw: Any) -> rollout.Outcome:
        plan = planning.plan_rollout(self.inventory, list(self.hosts), SHA, **kw)
        return rollout.run_rollout(self.fleet, plan, Source(), Source().resolve(SHA))

    def currents(self) -> dict[str, str | None]:
        return {n: h.current for n, h in self.hosts.items()}

    def switched(self) -> list[tuple[str, str]]:
        return [(e[1], e[2]) for e in self.log if e[0] == "switch"]

    def history(self) -> list[dict[str, Any]]:
        """Newest first."""
        return self.fleet.history.entries()


@pytest.fixture(autouse=True)
def no_bundle_no_git(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployer import bundle, sync

    monkeypatch.setattr(bundle, "build", lambda: type("B", (), {"id": BUNDLE})())
    monkeypatch.setattr(bundle, "facts", lambda: bundle.Facts(BUNDLE, "0" * 64))

    def pack_for_host(source: Any, revision: str, have: list[str]) -> bytes:
        assert isinstance(source, Source) and revision == "resolved-" + SHA, (source, revision)
        assert have == ["c" * 40], have  # what the host said it has
        return b"pack"

    monkeypatch.setattr(sync, "pack_for_host", pack_for_host)
    # one release name for the whole test, whatever second the plan is made in
    monkeypatch.setattr(planning, "release_name", lambda sha, when=None: NEW)
    monkeypatch.setattr(rollout, "release_name", lambda sha, when=None: NEW)


ROLLOUT = "[rollout]\ncanary = 1\nbatch = 1\nwatch = 0\n"


# --- rollout ---------------------------------------------------------------------------


def test_a_healthy_rollout_switches_batch_by_batch_canary_first(tmp_path: Path) -> None:
    w = World(tmp_path, 4, "[rollout]\ncanary = 1\nbatch = 2\n")
    outcome = w.rollout()
    assert outcome.ok and outcome.exit_code == 0 and outcome.failed == {}
    assert w.currents() == dict.fromkeys(w.hosts, NEW)
    assert w.switched() == [("web1", NEW), ("web2", NEW), ("web3", NEW), ("web4", NEW)]
    # each host is checked before the next batch starts
    health = [i for i, e in enumerate(w.log) if e[0] == "health"]
    switches = [i for i, e in enumerate(w.log) if e[0] == "switch"]
    assert health[0] < switches[1] and max(health[1:3]) < switches[3]
    assert all(h.pruned for h in w.hosts.values())
    assert all(not h.locked for h in w.hosts.values())
    assert not (w.fleet.state_dir / "shop.lock").exists()
    (entry,) = w.history()
    assert entry["result"] == "ok" and entry["releases"] == dict.fromkeys(w.hosts, NEW)
    import json

    lines = [json.loads(x) for x in (w.fleet.state_dir / "history.jsonl").read_text().splitlines()]
    # recorded when it started (a SIGKILL leaves that), then when it ended
    assert [(x["id"], x["result"]) for x in lines] == [
        (entry["id"], "running"),
        (entry["id"], "ok"),
    ]
    assert all(h.recorded == [entry] for h in w.hosts.values())


def test_a_host_failing_within_max_failed_goes_back_and_the_rollout_goes_on(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, 4, ROLLOUT + "max_failed = 1\n")
    w.healthy = lambda host, release: not (host == "web2" and release == NEW)
    outcome = w.rollout()
    assert outcome.ok and set(outcome.failed) == {"web2"}
    assert w.currents() == {"web1": NEW, "web2": OLD, "web3": NEW, "web4": NEW}
    assert outcome.releases == w.currents()
    assert ("web2", OLD) in w.switched()  # by the same switch-and-check procedure
    assert w.history()[0]["releases"]["web2"] == OLD
    assert not w.hosts["web2"].pruned and w.hosts["web2"].recorded == []


def test_one_failure_too_many_rolls_every_switched_host_back(tmp_path: Path) -> None:
    w = World(tmp_path, 4, ROLLOUT + "max_failed = 1\n")
    w.healthy = lambda host, release: not (host in ("web2", "web3") and release == NEW)
    outcome = w.rollout()
    assert not outcome.ok and outcome.exit_code == 1 and outcome.step == "switch"
    assert set(outcome.failed) == {"web2", "web3"}
    assert w.currents() == dict.fromkeys(w.hosts, OLD)
    assert outcome.releases == w.currents()
    assert ("web4", NEW) not in w.switched()  # the batch after the failure never started
    assert w.history()[0]["result"] == "failed"


def test_a_later_batch_failing_rolls_the_earlier_batches_back(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT)
    w.healthy = lambda host, release: not (host == "web3" and release == NEW)
    outcome = w.rollout()
    assert not outcome.ok and outcome.failed.keys() == {"web3"}
    assert w.currents() == dict.fromkeys(w.hosts, OLD)
    assert w.switched()[:3] == [("web1", NEW), ("web2", NEW), ("web3", NEW)]
    assert sorted(w.switched()[3:]) == [("web1", OLD), ("web2", OLD), ("web3", OLD)]


def test_the_canary_is_watched_before_any_other_host_switches(tmp_path: Path) -> None:
    """Only the canary's watch is waited out; each later batch is looked at again
    (seconds = 0: every crash since its switch) once the next one switched, and
    every host at the end."""
    w = World(tmp_path, 4, "[rollout]\ncanary = 1\nbatch = 1\nwatch = 7.5\n")
    assert w.rollout().ok
    order = [e[:3] if e[0] == "watch" else e[:2] for e in w.log if e[0] in ("switch", "watch")]
    assert order[:3] == [("switch", "web1"), ("watch", "web1", 7.5), ("switch", "web2")]
    assert order[3:6] == [("watch", "web1", 0), ("switch", "web3"), ("watch", "web1", 0)]
    assert order[6] == ("watch", "web2", 0)  # batch 2's watch went on beside batch 3
    assert order[7] == ("switch", "web4")
    assert sorted(order[8:]) == [("watch", h, 0) for h in w.hosts]  # the end: every host


def test_a_canary_failing_its_watch_switches_no_other_host(tmp_path: Path) -> None:
    w = World(tmp_path, 3, "[rollout]\nwatch = 5\n")
    w.watch_fails = {("web1", NEW)}
    outcome = w.rollout()
    assert not outcome.ok and outcome.failed.keys() == {"web1"}
    assert w.currents() == dict.fromkeys(w.hosts, OLD)
    assert w.switched() == [("web1", NEW), ("web1", OLD)]


def test_a_later_batch_failing_when_looked_at_again_rolls_back_all(tmp_path: Path) -> None:
    """web2 crashes after its health check: seen once web3 switched beside its watch;
    everything switched goes back."""
    w = World(tmp_path, 3, "[rollout]\ncanary = 1\nbatch = 1\nwatch = 5\n")
    w.watch_fails = {("web2", NEW)}
    outcome = w.rollout()
    assert not outcome.ok and outcome.failed.keys() == {"web2"}
    assert w.currents() == dict.fromkeys(w.hosts, OLD)
    assert w.switched()[:3] == [("web1", NEW), ("web2", NEW), ("web3", NEW)]


def test_halt_leaves_every_host_where_it_is(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT + 'on_failure = "halt"\n')
    w.healthy = lambda host, release: not (host == "web2" and release == NEW)
    outcome = w.rollout()
    assert not outcome.ok and outcome.step == "switch"
    assert w.currents() == {"web1": NEW, "web2": NEW, "web3": OLD}
    assert outcome.releases == w.currents()
    assert w.switched() == [("web1", NEW), ("web2", NEW)]


def test_a_failed_prepare_switches_no_host(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT)
    w.prepare_fails = {"web3"}
    outcome = w.rollout()
    assert not outcome.ok and outcome.step == "prepare" and outcome.failed.keys() == {"web3"}
    assert w.switched() == [] and w.currents() == dict.fromkeys(w.hosts, OLD)


def test_a_failed_prepare_within_max_failed_leaves_that_host_out(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT + "max_failed = 1\n")
    w.prepare_fails = {"web2"}
    outcome = w.rollout()
    assert outcome.ok and outcome.failed.keys() == {"web2"}
    assert w.currents() == {"web1": NEW, "web2": OLD, "web3": NEW}
    assert "web2" not in {h for h, _ in w.switched()}


def test_ctrl_c_puts_back_every_host_whose_current_moved(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT)
    w.interrupt = ("web2", NEW)
    with pytest.raises(KeyboardInterrupt):
        w.rollout()
    assert ("web3", NEW) not in w.switched()
    assert w.currents()["web1"] == OLD
    assert all(not h.locked for h in w.hosts.values())
    assert not (w.fleet.state_dir / "shop.lock").exists()


# Was a bug until 83ecf67: the hosts of the interrupted batch stayed on the new release.
def test_ctrl_c_during_a_batch_puts_that_batchs_hosts_back_too(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT)
    w.interrupt = ("web2", NEW)
    with pytest.raises(KeyboardInterrupt):
        w.rollout()
    assert w.currents() == {"web1": OLD, "web2": OLD, "web3": OLD}


def test_the_lock_is_refused_while_another_rollout_holds_a_host(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT)
    w.hosts["web2"].holder = owner()
    with pytest.raises(LockHeld, match="host web2: held by"):
        w.rollout()
    assert w.switched() == [] and not [e for e in w.log if e[0] != "lock"]
    assert not w.hosts["web1"].locked  # what it took, it gave back
    assert w.hosts["web2"].holder == owner()  # and what it did not take, it left
    assert not (w.fleet.state_dir / "shop.lock").exists()


def test_an_agent_of_another_version_is_refused_before_anything(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT)
    w.hosts["web2"].state = lambda: FakeHost.state(w.hosts["web2"])._replace(bundle="0.0.1+old")
    outcome = w.rollout()
    assert not outcome.ok and outcome.step == "prepare"
    assert "host agent is 0.0.1+old" in outcome.failed["web2"]
    assert w.switched() == []


# --- migrations around the switch ------------------------------------------------------

MIGRATIONS = '[migrations]\ndatabase = "sqlite:///app.sqlite3"\n'


def steps(w: World) -> list[str]:
    """migrate phases and switches, in order: 'expand@<release>', 'switch web1'..."""
    out = []
    for e in w.log:
        if e[0] == "migrate":
            args = list(e[1:])
            phase = args[args.index("--phase") + 1]
            where = args[args.index("--release") + 1] if "--release" in args else "current"
            out.append(f"{phase}@{'new' if where == NEW else where}")
        elif e[0] == "switch":
            out.append(f"switch {e[1]}")
    return out


def test_expand_before_the_first_switch_contract_after_the_last(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT + MIGRATIONS)
    assert w.rollout().ok
    assert steps(w) == ["expand@new", "switch web1", "switch web2", "contract@new"]
    assert [(kw["cwd"], kw["database"]) for kw in w.migrate_kw] == [
        ("/srv/web1/shared", "sqlite:///app.sqlite3")
    ] * 2
    (expand,) = [e for e in w.log if e[0] == "migrate" and "expand" in e]
    assert expand[expand.index("--dir") + 1] == f"/srv/web1/releases/{NEW}/migrations"


def test_contract_next_rollout_runs_the_running_releases_contract_first(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, 2, ROLLOUT + MIGRATIONS + 'contract = "next-rollout"\n')
    assert w.rollout().ok
    assert steps(w) == ["contract@current", "expand@new", "switch web1", "switch web2"]
    (deferred,) = [e for e in w.log if e[0] == "migrate" and "contract" in e]
    assert deferred[deferred.index("--dir") + 1] == "/srv/web1/current/migrations"


def test_a_failed_expand_switches_no_host(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT + MIGRATIONS)
    w.migrate_fails = "expand"
    outcome = w.rollout()
    assert not outcome.ok and outcome.step == "expand" and w.switched() == []


def test_a_failed_contract_leaves_the_hosts_on_the_new_release(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT + MIGRATIONS)
    w.migrate_fails = "contract"
    outcome = w.rollout()
    assert not outcome.ok and outcome.step == "contract"
    assert w.currents() == dict.fromkeys(w.hosts, NEW)


def test_migrations_host_must_be_selected(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT + MIGRATIONS + 'host = "web3"\n')
    w.fleet.remotes = {n: w.hosts[n] for n in ("web1", "web2")}  # --hosts 'web[12]'
    with pytest.raises(BadInput, match="'web3' is not among the selected hosts"):
        migrating.run_migrations(w.fleet, "expand", NEW)
    # reading the schema's state does not need the new release: it asks web3 anyway
    assert migrating.migrations_host(w.fleet, needs_release=False).name == "web3"


# --- rollback --------------------------------------------------------------------------


def rolled_out(tmp_path: Path, hosts: int, extra: str = "") -> World:
    w = World(tmp_path, hosts, ROLLOUT + extra)
    assert w.rollout().ok
    w.log.clear()
    return w


def test_rollback_goes_back_batch_by_batch(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 3)
    plan, outcome = rollout.run_rollback(w.fleet, None, dry_run=False)
    assert outcome is not None and outcome.ok
    assert plan.batches == (("web1",), ("web2",), ("web3",))
    assert w.switched() == [("web1", OLD), ("web2", OLD), ("web3", OLD)]
    assert w.history()[0]["action"] == "rollback"


def test_rollback_dry_run_changes_nothing(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2)
    plan, outcome = rollout.run_rollback(w.fleet, None, dry_run=True)
    assert outcome is None and plan.targets == {"web1": OLD, "web2": OLD}
    assert w.switched() == [] and w.currents() == dict.fromkeys(w.hosts, NEW)


def test_rollback_halts_at_the_first_host_that_fails(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 3)
    w.healthy = lambda host, release: not (host == "web2" and release == OLD)
    _, outcome = rollout.run_rollback(w.fleet, None, dry_run=False)
    assert outcome is not None and not outcome.ok and outcome.failed.keys() == {"web2"}
    assert w.currents() == {"web1": OLD, "web2": NEW, "web3": NEW}
    assert outcome.releases == w.currents()
    assert "web3" not in {h for h, _ in w.switched()}


def test_rollback_to_a_missing_release_is_refused_before_anything(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2)
    w.hosts["web2"].releases.remove(OLD)
    with pytest.raises(BadInput, match=f"release {OLD} does not exist on: web2"):
        rollout.run_rollback(w.fleet, OLD, dry_run=False)
    assert w.switched() == []


def test_rollback_past_a_contract_is_refused_unless_forced(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2)
    rows = [answers.MigrationRow("0002_drop", "contract", "applied", NEW)]
    w.fleet.inventory = w.inventory  # migrations are read through this stub:
    original = migrating.applied
    try:
        migrating.applied = lambda fleet: rows  # type: ignore[assignment]
        with pytest.raises(BadInput, match="0002_drop"):
            rollout.run_rollback(w.fleet, None, dry_run=False)
        assert w.switched() == []
        _, outcome = rollout.run_rollback(w.fleet, None, dry_run=False, force=True)
    finally:
        migrating.applied = original  # type: ignore[assignment]
    assert outcome is not None and outcome.ok and w.currents() == dict.fromkeys(w.hosts, OLD)


# --- the plan --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "total", "size"),
    [
        (3, 10, 3),
        ("10%", 10, 1),
        ("10%", 11, 2),
        ("50%", 3, 2),
        ("100%", 7, 7),
        ("1%", 1, 1),
        ("1%", 101, 2),
    ],  # fmt: skip
)
def test_batch_size_rounds_percentages_up(spec: int | str, total: int, size: int) -> None:
    assert planning.batch_size(spec, total) == size


def test_split_batches_edges() -> None:
    hosts = [f"h{i}" for i in range(5)]
    assert planning.split_batches(hosts, 0, []) == [[h] for h in hosts]  # default: one at a time
    assert planning.split_batches(hosts, 2, [10]) == [["h0", "h1"], ["h2", "h3", "h4"]]
    assert planning.split_batches(hosts, 0, [1, 2]) == [["h0"], ["h1", "h2"], ["h3", "h4"]]
    assert planning.split_batches(hosts[:1], 3, [1]) == [["h0"]]


@pytest.mark.parametrize(
    ("spec", "total", "allowed"),
    [(0, 5, 0), (2, 5, 2), ("10%", 10, 1), ("19%", 10, 1), ("20%", 10, 2), ("50%", 3, 1)],
)
def test_allowed_failures_rounds_down(spec: int | str, total: int, allowed: int) -> None:
    assert planning.allowed_failures(spec, total) == allowed


def test_plan_renders_what_it_will_do(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT + "parallel = 2\n")
    plan = planning.plan_rollout(w.inventory, ["web1", "web2", "web3"], SHA)
    assert plan.hosts == ["web1", "web2", "web3"] and plan.parallel == 2
    assert plan.render().splitlines() == [
        f"rollout of shop at {SHA} to 3 host(s)",
        "  1. lock; prepare web1, web2, web3 (at most 2 at once): "
        "sync, release, link shared, build",
        "  2. migrations: expand",
        f"  switch canary batch: web1 -> {NEW}; reload master; check health",
        f"  switch batch 2: web2 -> {NEW}; reload master; check health",
        f"  switch batch 3: web3 -> {NEW}; reload master; check health",
        "  after each later batch and at the end: every switched host looked at again "
        "(a crash since its switch, a worker not ready, a failing probe)",
        "  3. migrations: contract; prune old releases; record history",
        "  on failure: rollback (hosts allowed to fail: 0)",
    ]
    one = planning.plan_rollout(w.inventory, ["web1"], SHA, canary=0)
    assert "  switch batch 1: web1" in one.render()
    back = planning.plan_rollback(
        w.inventory, {"web1": FakeHost(w, "web1", w.inventory.hosts["web1"]).state()}, OLD
    )
    assert back.render().splitlines()[0] == "rollback of shop to 1 host(s)"
    assert "migrations" not in back.render()


def test_check_rollback_boundaries() -> None:
    rows = [
        answers.MigrationRow("a", "contract", "applied", "r2"),
        answers.MigrationRow("b", "expand", "applied", "r3"),
        answers.MigrationRow("c", "expand", "applied", None),
    ]
    assert migrating.check_rollback(rows, "r3", force=False) == []  # its own are not "newer"
    assert migrating.check_rollback(rows, "r2", force=False) == ["b (expand, release r3)"]
    with pytest.raises(BadInput, match="contract migrations a already ran .shipped by r2."):
        migrating.check_rollback(rows, "r1", force=False)


# --- locks -----------------------------------------------------------------------------


def owner(**kw: Any) -> answers.LockOwner:
    base = answers.LockOwner("id1", "shop", "f" * 40, "rollout", "alice", "elsewhere", 1, "t0")
    return base._replace(**kw)


def test_stale_by_heartbeat_age() -> None:
    now = time.time()
    assert lock.stale_reason(owner(heartbeat=now - 5)) is None
    assert lock.stale_reason(owner(heartbeat=now - lock.STALE_AFTER_S + 5)) is None
    why = lock.stale_reason(owner(heartbeat=now - lock.STALE_AFTER_S - 5))
    assert why is not None and why.startswith("no heartbeat for 12")
    assert lock.stale_reason(owner(heartbeat=None)) is None


def test_stale_by_pid_on_this_controller_only() -> None:
    here = socket.gethostname()
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    assert lock.stale_reason(owner(controller=here, pid=gone)) == (
        f"pid {gone} is not running on {here}"
    )
    assert lock.stale_reason(owner(controller=here, pid=os.getpid())) is None
    assert lock.stale_reason(owner(controller="elsewhere", pid=gone)) is None


def test_describe_a_holder() -> None:
    text = lock.describe(owner(heartbeat=time.time()), "host web1")
    assert text == (f"host web1: held by alice@elsewhere (pid 1) since t0: rollout of {'f' * 12}")
    stale = lock.describe(owner(heartbeat=time.time() - 1000), "host web1")
    assert stale.endswith("; break it with `deployer unlock`]") and "[stale: no heartbeat" in stale
    assert lock.describe(None, "x") == "x: held (owner unknown)"


def test_controller_lock_is_exclusive_and_released_only_by_its_owner(tmp_path: Path) -> None:
    a, b = lock.Owner("shop", "r", user="alice"), lock.Owner("shop", "r", user="bob")
    first = lock.ControllerLock(tmp_path, "shop")
    first.acquire(a)
    with pytest.raises(LockHeld, match="held by alice@"):
        lock.ControllerLock(tmp_path, "shop").acquire(b)
    first.release(b)  # not bob's to release
    assert first.holder() is not None and first.holder().id == a.id
    first.release(a)
    assert first.holder() is None
    lock.ControllerLock(tmp_path, "shop").acquire(b)
    assert first.force_release().user == "bob" and first.holder() is None


def test_controller_lock_waits_for_a_holder_to_finish(tmp_path: Path) -> None:
    import threading

    a = lock.Owner("shop", "r")
    held = lock.ControllerLock(tmp_path, "shop")
    held.acquire(a)
    threading.Timer(0.3, held.release, args=(a,)).start()
    lock.ControllerLock(tmp_path, "shop").acquire(lock.Owner("shop", "r2"), wait=10)
    assert held.holder().revision == "r2"


# --- the master on each host -------------------------------------------------------------

MASTER = '[master]\ncommand = "app"\nlisten = "{address}:80"\n'


def test_the_first_rollout_starts_the_master_the_next_ones_reload_it(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT + MASTER)
    assert w.rollout().ok
    assert [e for e in w.log if "master" in e[0]] == [
        ("start master", "web1"),
        ("start master", "web2"),
    ]
    w.log.clear()
    assert w.rollout().ok
    assert [e for e in w.log if "master" in e[0]] == [
        ("reload master", "web1"),
        ("reload master", "web2"),
    ]


def test_hosts_without_a_master_are_only_switched(tmp_path: Path) -> None:
    w = World(tmp_path, 1, ROLLOUT)
    assert w.rollout().ok
    assert not [e for e in w.log if "master" in e[0]]


# --- what is recorded ------------------------------------------------------------------


def test_history_says_what_happened(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT)
    w.prepare_fails = {"web2"}
    w.rollout()
    entry = w.history()[0]
    assert (entry["result"], entry["failed_step"], entry["note"]) == (
        "failed",
        "prepare",
        "no host was switched",
    )
    assert entry["failures"] == {"web2": "prepare failed: build exited with 3"}
    assert entry["action"] == "rollout" and entry["revision"] == SHA and entry["release"] == NEW
    assert entry["hosts"] == ["web1", "web2"] and entry["duration_s"] >= 0
    assert w.hosts["web1"].recorded == [entry] and w.hosts["web2"].recorded == []

    w = World(tmp_path / "b", 2, ROLLOUT)
    w.healthy = lambda host, release: release != NEW
    w.rollout()
    entry = w.history()[0]
    assert (entry["failed_step"], entry["note"]) == (
        "switch",
        f"switched hosts rolled back (web1 runs {OLD})",  # the canary; web2 never moved
    )
    assert entry["releases"] == {"web1": OLD, "web2": OLD}

    w = World(tmp_path / "c", 3, ROLLOUT + 'on_failure = "halt"\n')
    w.healthy = lambda host, release: not (host == "web2" and release == NEW)
    w.rollout()
    assert w.history()[0]["note"] == f"halted: web1 runs {NEW}, web2 runs {NEW}, web3 runs {OLD}"


def test_history_says_when_a_rollback_of_the_rollout_failed_too(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT)
    w.healthy = lambda host, release: host == "web1"
    w.switch_fails = {("web1", OLD)}
    outcome = w.rollout()  # web2 fails on NEW; going back, web1's switch fails
    assert not outcome.ok
    assert w.history()[0]["note"] == (
        f"switched hosts rolled back (web1 runs {NEW}, web2 runs {OLD}); rollback FAILED on web1"
    )
    assert outcome.releases == {"web1": NEW, "web2": OLD} == w.currents()


def test_a_rollback_is_recorded_as_one(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2)
    rollout.run_rollback(w.fleet, None, dry_run=False)
    entry = w.history()[0]
    assert (entry["action"], entry["result"], entry["release"]) == ("rollback", "ok", None)
    assert entry["id"].split("-")[1] == "rollback" and entry["hosts"] == ["web1", "web2"]
    assert entry["releases"] == {"web1": OLD, "web2": OLD}
    w.healthy = lambda host, release: False
    _, outcome = rollout.run_rollback(w.fleet, NEW, dry_run=False)
    assert outcome is not None and outcome.step == "switch"
    assert w.history()[0]["note"] == "halted; failed hosts returned to where they were"


def test_a_host_without_a_previous_release_is_left_as_it_is(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT + "max_failed = 1\n")
    w.hosts["web2"].current = None
    w.hosts["web2"].releases = []
    w.healthy = lambda host, release: host != "web2"
    outcome = w.rollout()
    assert outcome.ok and outcome.releases == {"web1": NEW, "web2": None}
    assert w.switched() == [("web1", NEW), ("web2", NEW)]  # nothing to go back to


# --- the rollback floor and the schema -------------------------------------------------

STATUS = "\n".join(
    [
        '{"event": "migration", "name": "m1", "phase": "expand", "state": "applied",'
        f' "release": "{OLD}"}}',
        '{"event": "migration", "name": "m2", "phase": "expand", "state": "applied",'
        f' "release": "{NEW}"}}',
        '{"event": "migration", "name": "m3", "phase": "expand", "state": "missing",'
        f' "release": "{NEW}"}}',
        '{"event": "migration", "name": "m4", "phase": "expand", "state": "pending",'
        ' "release": null}',
        '{"event": "summary"}',
    ]
)


def test_applied_reads_the_migrations_hosts_status(tmp_path: Path) -> None:
    w = World(tmp_path, 2, MIGRATIONS + 'host = "web2"\ndir = "db/migrations"\n')
    w.fleet.remotes = {"web1": w.hosts["web1"]}  # web2 is not selected: asked anyway
    w.migrate_stdout = STATUS
    rows = migrating.applied(w.fleet)
    assert [(r.name, r.state) for r in rows] == [("m1", "applied"), ("m2", "applied"),
                                                 ("m3", "missing")]  # fmt: skip
    (call,) = [e for e in w.log if e[0] == "migrate"]
    assert call[1:] == ("status", "--json", "--dir", "/srv/web2/current/db/migrations")
    assert w.migrate_kw == [{"cwd": "/srv/web2/shared", "database": "sqlite:///app.sqlite3"}]
    assert migrating.applied(World(tmp_path / "none", 1).fleet) == []


def test_migrate_from_the_controller_runs_on_the_migrations_host(tmp_path: Path) -> None:
    w = World(tmp_path, 2, MIGRATIONS + 'host = "web2"\n')
    w.fleet.remotes = {"web1": w.hosts["web1"]}  # web2 is not selected: asked anyway
    code, err = migrating.on_host(w.fleet, ["down", "--to", "x"], on_line=print)
    assert (code, err) == (0, "warned")
    (call,) = [e for e in w.log if e[0] == "migrate"]
    assert call[1:] == ("down", "--dir", "/srv/web2/current/migrations", "--to", "x")
    assert w.migrate_kw == [
        {"cwd": "/srv/web2/shared", "database": "sqlite:///app.sqlite3", "check": False,
         "on_line": print}
    ]  # fmt: skip


def test_rollback_with_migrations_runs_expand_downs_newest_release_first(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2, MIGRATIONS)
    newer = "20270101000000-ccccccc"
    w.migrate_stdout = STATUS.replace(f'"name": "m3", "phase": "expand", "state": "missing",'
                                      f' "release": "{NEW}"', f'"name": "m3", "phase": "expand",'
                                      f' "state": "applied", "release": "{newer}"')  # fmt: skip
    w.log.clear()
    _, outcome = rollout.run_rollback(w.fleet, None, dry_run=False, migrations=True)
    assert outcome is not None and outcome.ok
    downs = [e[1:] for e in w.log if e[0] == "migrate" and e[1] == "down"]
    assert downs == [
        ("down", "--release", newer, "--phase", "expand", "--dir",
         f"/srv/web1/releases/{newer}/migrations"),
        ("down", "--release", NEW, "--phase", "expand", "--dir",
         f"/srv/web1/releases/{NEW}/migrations"),
    ]  # fmt: skip
    # the hosts went back first
    first_down = next(i for i, e in enumerate(w.log) if e[0] == "migrate" and e[1] == "down")
    assert max(i for i, e in enumerate(w.log) if e[0] == "switch") < first_down


def test_rollback_without_migrations_leaves_the_schema(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2, MIGRATIONS)
    w.migrate_stdout = STATUS
    w.log.clear()
    _, outcome = rollout.run_rollback(w.fleet, None, dry_run=False)
    assert outcome is not None and outcome.ok
    assert not [e for e in w.log if e[0] == "migrate" and e[1] == "down"]


def test_a_failed_down_is_reported_after_the_hosts_are_back(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2, MIGRATIONS)
    w.migrate_stdout = STATUS
    w.migrate_fails = "down"
    _, outcome = rollout.run_rollback(w.fleet, None, dry_run=False, migrations=True)
    assert outcome is not None and not outcome.ok and outcome.step == "migrations down"
    assert w.currents() == dict.fromkeys(w.hosts, OLD)
    assert w.history()[0]["note"] == "hosts are back; schema is not"


# --- breaking locks --------------------------------------------------------------------


def controller_lock(w: World, who: answers.LockOwner, age: float) -> Path:
    import json

    path = w.fleet.state_dir / "shop.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(who._asdict()))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_unlock_breaks_only_stale_locks_and_records_it(tmp_path: Path) -> None:
    w = World(tmp_path, 3)
    old = lock.STALE_AFTER_S + 60
    path = controller_lock(w, owner(), old)
    w.hosts["web1"].holder = owner(heartbeat=time.time() - old)
    w.hosts["web2"].holder = owner(heartbeat=time.time())
    with pytest.raises(LockHeld) as held:
        lock.break_locks(w.fleet, force=False)
    assert not path.exists() and w.hosts["web1"].holder is None
    assert w.hosts["web2"].holder is not None  # alive: left alone
    assert str(held.value).startswith("host web2: held by alice@elsewhere")
    assert str(held.value).endswith("(the holder looks alive; use --force to break it)")
    (entry,) = w.history()
    assert entry["action"] == "unlock" and entry["result"] == "ok"
    assert [b.split(":")[0] for b in entry["broke"]] == [f"broke deploy lock {path}",
                                                         "broke host web1"]  # fmt: skip
    said = lock.break_locks(w.fleet, force=True)
    assert said == [f"broke host web2: held by alice@elsewhere (pid 1) since t0: "
                    f"rollout of {'f' * 12}"]  # fmt: skip
    assert w.hosts["web2"].holder is None
    assert lock.break_locks(w.fleet, force=False) == ["no lock held"]
    assert len(w.history()) == 2


def test_unlock_refuses_a_live_controller_lock_without_force(tmp_path: Path) -> None:
    w = World(tmp_path, 1)
    path = controller_lock(w, owner(), 5)
    with pytest.raises(LockHeld, match=f"deploy lock {path}: held by alice@elsewhere"):
        lock.break_locks(w.fleet, force=False)
    assert path.exists()
    lock.break_locks(w.fleet, force=True)
    assert not path.exists()


def test_an_unreadable_controller_lock_is_held_by_someone_unknown(tmp_path: Path) -> None:
    held = lock.ControllerLock(tmp_path, "shop")
    held.path.write_text("{not json")
    holder = held.holder()
    assert holder is not None and holder.id == ""
    with pytest.raises(LockHeld, match="held .owner unknown."):
        held.acquire(lock.Owner("shop", "r"))
    assert held.force_release() == holder._replace(heartbeat=None) or held.holder() is None


def test_locks_beat_while_held_and_a_failing_host_gives_back_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    w = World(tmp_path, 2)
    me = lock.Owner("shop", "r")
    path = w.fleet.state_dir / "shop.lock"
    with lock.FleetLocks(w.fleet, me) as held:
        assert held.held == ["web1", "web2"]
        os.utime(path, (0, 0))
        wait = time.monotonic() + 10
        while not ({"web1", "web2"} <= set(w.heartbeats) and path.stat().st_mtime > 0):
            assert time.monotonic() < wait, "no heartbeat"
            time.sleep(0.01)
        assert w.hosts["web1"].holder == me.wire()
    assert not path.exists() and not any(h.locked for h in w.hosts.values())
    w.lock_fails = {"web2"}
    with pytest.raises(StepFailed, match="web2"), lock.FleetLocks(w.fleet, me):
        pass
    assert not w.hosts["web1"].locked and not path.exists()


def test_an_agent_version_mismatch_names_both_versions(tmp_path: Path) -> None:
    w = World(tmp_path, 1, ROLLOUT)
    w.hosts["web1"].state = lambda: FakeHost.state(w.hosts["web1"])._replace(bundle=None)
    _, failures = rollout.check_agents(w.fleet, ["web1"])
    assert failures == {
        "web1": f"version check failed: host agent is an older one, this controller is {BUNDLE}: "
        "run `deployer setup`"
    }


# --- what the rollout hands on: owners, history fields, failure keys -------------------


def test_the_locks_and_the_history_name_the_rollout(tmp_path: Path) -> None:
    import getpass

    w = World(tmp_path, 2, ROLLOUT)
    plan = planning.plan_rollout(w.inventory, list(w.hosts), SHA)
    resolved = Source().resolve(SHA)
    assert rollout.run_rollout(w.fleet, plan, Source(), resolved, deploy_id="d-42", log="/x.log").ok
    assert {(o.app, o.revision, o.action, o.id) for o in w.owners} == {
        ("shop", SHA, "rollout", "d-42")
    }
    entry = w.history()[0]
    assert (entry["id"], entry["log"], entry["user"]) == ("d-42", "/x.log", getpass.getuser())
    assert entry["controller"] == socket.gethostname() and entry["started"] == w.owners[0].since
    w.owners.clear()
    assert w.rollout().ok
    assert w.history()[0]["id"] == w.owners[0].id and w.history()[0]["log"] is None


def test_a_rollback_names_itself_in_its_locks(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2)
    w.owners.clear()
    rollout.run_rollback(w.fleet, None, dry_run=False)
    assert {(o.app, o.revision, o.action) for o in w.owners} == {("shop", "previous", "rollback")}
    entry = w.history()[0]
    assert entry["revision"] is None and entry["user"] and entry["controller"]
    assert entry["started"] == w.owners[0].since
    assert entry["id"] == w.owners[0].id
    w.owners.clear()
    rollout.run_rollback(w.fleet, NEW, dry_run=False)
    assert {(o.revision, o.action) for o in w.owners} == {(NEW, "rollback")}


def test_a_rollback_refuses_hosts_it_cannot_read(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2)

    def unreadable() -> answers.HostState:
        raise StepFailed("web2", "state", "cannot connect")

    w.hosts["web2"].state = unreadable
    with pytest.raises(StepFailed) as e:
        rollout.run_rollback(w.fleet, None, dry_run=False)
    assert str(e.value) == "web2: state failed: cannot connect"  # the step said once
    assert w.switched() == []


def test_a_rollback_waits_out_no_watch_and_looks_at_every_host(tmp_path: Path) -> None:
    """Back to releases that ran: no canary, no watch to wait out; the default batch
    switches every host at once, and each is looked at again at the end."""
    w = rolled_out(tmp_path, 2)
    w.inventory = w.fleet.inventory = World(tmp_path / "w", 2, "[rollout]\nwatch = 3\n").inventory
    plan, _ = rollout.run_rollback(w.fleet, None, dry_run=False)
    assert plan.batches == (("web1", "web2"),)
    assert sorted(e for e in w.log if e[0] == "watch") == [
        ("watch", "web1", 0),
        ("watch", "web2", 0),
    ]


def test_no_wait_when_watch_is_zero(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT)
    assert w.rollout().ok
    assert sorted(e for e in w.log if e[0] == "watch") == [
        ("watch", "web1", 0),
        ("watch", "web2", 0),
    ]
    w = World(tmp_path / "b", 1, "[rollout]\nwatch = 0.5\n")
    assert w.rollout().ok
    assert [e for e in w.log if e[0] == "watch"] == [("watch", "web1", 0.5)]


def test_failure_keys_and_notes(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT + MIGRATIONS)
    w.migrate_fails = "expand"
    outcome = w.rollout()
    assert outcome.failed == {"migrations": "web1: migrations failed: no such table"}
    assert w.history()[0]["note"] == "no host was switched"
    w = World(tmp_path / "b", 2, ROLLOUT + MIGRATIONS)
    w.migrate_fails = "contract"
    outcome = w.rollout()
    assert outcome.failed == {"migrations": "web1: migrations failed: no such table"}
    assert w.history()[0]["note"] == "hosts stay on the new release (safe: contract runs last)"
    w = rolled_out(tmp_path / "c", 2, MIGRATIONS)
    w.migrate_stdout = STATUS
    w.migrate_fails = "down"
    _, outcome = rollout.run_rollback(w.fleet, None, dry_run=False, migrations=True)
    assert outcome is not None
    assert outcome.failed == {"migrations": "web1: migrations failed: no such table"}


def test_ctrl_c_is_recorded_with_where_each_host_is(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT)
    w.interrupt = ("web2", NEW)
    with pytest.raises(KeyboardInterrupt):
        w.rollout()
    entry = w.history()[0]
    assert entry["failures"] == {"interrupted": "Ctrl-C or SIGTERM"}
    assert entry["releases"] == {"web1": OLD, "web2": OLD, "web3": OLD}
    assert entry["note"] == f"switched hosts rolled back (web1 runs {OLD}, web2 runs {OLD})"


def test_a_host_that_never_had_a_release_is_named_so(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT)
    w.hosts["web2"].current = None
    w.hosts["web2"].releases = []
    w.healthy = lambda host, release: host != "web2"
    outcome = w.rollout()
    assert not outcome.ok
    assert w.history()[0]["note"] == (  # web2 was not rolled back: said as it is
        f"switched hosts rolled back (web1 runs {OLD}); web2 had no previous release: left on {NEW}"
    )


def test_plan_text_of_two_batches_and_a_watch(tmp_path: Path) -> None:
    w = World(tmp_path, 2, "[rollout]\ncanary = 1\nbatch = 1\nwatch = 7.5\n")
    text = planning.plan_rollout(w.inventory, ["web1", "web2"], SHA).render()
    canary = f"  switch canary batch: web1 -> {NEW}; reload master; check health; watch 7.5s from"
    assert (
        f"{canary} its switch\n  switch batch 2: web2 -> {NEW}; reload master; check health\n"
        in text
    )
    assert "after each later batch and at the end: every switched host looked at again" in text


def test_missing_release_names_what_each_host_has(tmp_path: Path) -> None:
    w = rolled_out(tmp_path, 2)
    w.hosts["web2"].releases = []
    with pytest.raises(BadInput) as e:
        rollout.run_rollback(w.fleet, OLD, dry_run=False)
    assert str(e.value) == f"release {OLD} does not exist on: web2 (has: none)"


def test_unlock_reports_hosts_it_could_not_check(tmp_path: Path) -> None:
    w = World(tmp_path, 3)
    w.hosts["web1"].holder = owner(heartbeat=time.time() - lock.STALE_AFTER_S - 60)
    w.lock_fails = {"web2", "web3"}
    with pytest.raises(StepFailed) as e:
        lock.break_locks(w.fleet, force=False)
    assert str(e.value) == ("web2, web3: unlock failed: locks on these hosts were not checked")
    assert w.hosts["web1"].holder is None  # what it could check, it did
    (entry,) = w.history()
    assert (entry["app"], entry["revision"], entry["action"]) == ("shop", "", "unlock")
    assert entry["broke"][0].startswith("broke host web1: held by alice@elsewhere (pid 1)")


def test_controller_lock_file_details(tmp_path: Path) -> None:
    import json
    import stat

    held = lock.ControllerLock(tmp_path, "shop")
    me = lock.Owner("shop", "r")
    started = time.monotonic()
    held.acquire(me)
    assert stat.S_IMODE(held.path.stat().st_mode) == 0o600  # for its user only (issue 23.6)
    assert json.loads(held.path.read_text()) == me.to_dict()
    with pytest.raises(LockHeld) as e:
        lock.ControllerLock(tmp_path, "shop").acquire(lock.Owner("shop", "r2"))
    assert time.monotonic() - started < 0.5  # no waiting unless asked
    assert str(e.value).startswith(f"deploy lock {held.path}: held by ")
    os.utime(held.path, (1000, 1000))
    held.heartbeat()
    assert held.path.stat().st_mtime > 1000
    held.release(me)
    held.heartbeat()  # no lock, no error
    held.release(me)
    assert held.force_release() is None
    held.path.write_text("[1, 2]")  # valid JSON, not an owner
    assert held.holder() == answers.LockOwner("", heartbeat=held.path.stat().st_mtime)


def test_a_waiting_lock_takes_over_soon_after_the_release(tmp_path: Path) -> None:
    import threading

    a = lock.Owner("shop", "r")
    held = lock.ControllerLock(tmp_path, "shop")
    held.acquire(a)
    released_at: list[float] = []

    def release() -> None:
        held.release(a)
        released_at.append(time.monotonic())

    threading.Timer(0.2, release).start()
    lock.ControllerLock(tmp_path, "shop").acquire(lock.Owner("shop", "r2"), wait=10)
    took_over = time.monotonic()
    assert held.holder().revision == "r2"
    # it looks again at least once a second: never much more than that after the release
    assert took_over - released_at[0] < 1.6


def test_fleet_locks_wait_as_long_as_the_session_says(tmp_path: Path) -> None:
    import threading

    w = World(tmp_path, 1, ROLLOUT)
    w.fleet.lock_wait = 10
    other = lock.Owner("shop", "r")
    held = lock.ControllerLock(w.fleet.state_dir, "shop")
    held.acquire(other)
    threading.Timer(0.2, held.release, args=(other,)).start()
    assert w.rollout().ok  # waited for the other rollout instead of refusing


def test_stale_reason_never_signals_the_holder(tmp_path: Path) -> None:
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    try:
        holder = owner(controller=socket.gethostname(), pid=child.pid)
        assert lock.stale_reason(holder) is None
        # only asked whether it is alive (signal 0): still alive a while later
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()


def test_a_stale_lock_is_taken_over_and_its_deploy_marked_interrupted(tmp_path: Path) -> None:
    w = World(tmp_path, 2, ROLLOUT)
    age = lock.STALE_AFTER_S + 60
    dead = owner(id="dead-deploy", heartbeat=time.time() - age)
    path = controller_lock(w, dead, age)
    w.hosts["web1"].holder = dead
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    # web2's lock beat lately, but its holder ran here, and its pid is gone
    here = socket.gethostname()
    w.hosts["web2"].holder = dead._replace(controller=here, pid=gone, heartbeat=time.time())
    w.fleet.history.append({**dead.to_json(), "result": "running"})  # what it left
    assert w.rollout().ok
    records = [e for e in w.history() if e["id"] == "dead-deploy"]
    assert [e["result"] for e in records] == ["interrupted"]  # its last word
    assert records[0]["note"] == f"its lock went stale and was taken over by {w.owners[0].id}"
    assert not path.exists() and not any(h.locked for h in w.hosts.values())


def test_a_finished_deploys_stale_lock_is_taken_over_without_a_record(tmp_path: Path) -> None:
    w = World(tmp_path, 1, ROLLOUT)
    dead = owner(id="failed-deploy", heartbeat=time.time() - lock.STALE_AFTER_S - 60)
    w.hosts["web1"].holder = dead
    w.fleet.history.append({**dead.to_json(), "result": "failed"})
    assert w.rollout().ok
    assert [e["result"] for e in w.history() if e["id"] == "failed-deploy"] == ["failed"]


def test_a_live_lock_elsewhere_is_not_taken_over(tmp_path: Path) -> None:
    w = World(tmp_path, 1, ROLLOUT)
    controller_lock(w, owner(id="alive"), 5)
    with pytest.raises(LockHeld, match="held by alice@elsewhere"):
        w.rollout()
    assert w.switched() == []


def test_down_expand_runs_on_the_migrations_host_even_unselected(tmp_path: Path) -> None:
    w = World(tmp_path, 2, MIGRATIONS + 'host = "web2"\n')
    w.fleet.remotes = {"web1": w.hosts["web1"]}
    migrating.down_expand(w.fleet, [OLD, NEW, OLD])
    assert [e[1:4] for e in w.log if e[0] == "migrate"] == [
        ("down", "--release", NEW),
        ("down", "--release", OLD),
    ]
    assert all(kw["cwd"] == "/srv/web2/shared" for kw in w.migrate_kw)
    assert all(kw["database"] == "sqlite:///app.sqlite3" for kw in w.migrate_kw)
    assert all("on_line" in kw for kw in w.migrate_kw)


def test_ctrl_c_with_halt_records_where_each_host_stopped(tmp_path: Path) -> None:
    w = World(tmp_path, 3, ROLLOUT + 'on_failure = "halt"\n')
    w.interrupt = ("web2", NEW)
    with pytest.raises(KeyboardInterrupt):
        w.rollout()
    assert w.history()[0]["releases"] == {"web1": NEW, "web2": NEW, "web3": OLD} == w.currents()


def test_a_stale_controller_lock_replaced_meanwhile_is_given_back(tmp_path: Path) -> None:
    import json

    taker = lock.ControllerLock(tmp_path, "shop")
    live = owner(id="new-taker")
    taker.path.write_text(json.dumps(live._asdict()))
    # we saw a stale holder "old", but by now another taker has put its own lock there
    assert taker._move_aside(owner(id="old")) is False
    assert taker.holder().id == "new-taker" and list(tmp_path.iterdir()) == [taker.path]
    assert taker._move_aside(owner(id="new-taker")) is True
    assert list(tmp_path.iterdir()) == []
    assert taker._move_aside(owner(id="gone")) is False  # nothing there to move
