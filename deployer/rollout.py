"""The plan (pure data, printable with --dry-run) and its execution.

    lock -> prepare every host in parallel -> expand -> switch batch by batch
    (flip `current`, master reload, health) -> contract -> prune, record

Nothing that serves traffic changes before the first switch. After it, any
failure past `max_failed` puts every switched host back on the release it ran
before (on_failure = "rollback"), with the same reload-and-health procedure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from deployer.errors import BadInput, DeployerError, LockHeld
from deployer.history import History
from deployer.inventory import Host as HostConfig
from deployer.inventory import Inventory
from deployer.lock import ControllerLock, Owner, describe
from deployer.remote import RemoteHost, StepFailed
from deployer.schema import run_migrations
from deployer.transport import HostPool

EXIT_OK, EXIT_FAILED = 0, 1
HEARTBEAT_S = 10.0


# --- the plan -------------------------------------------------------------------------


def batch_size(spec: int | str, total: int) -> int:
    if isinstance(spec, int):
        return spec
    return max(1, math.ceil(total * float(spec.rstrip("%")) / 100))


def split_batches(hosts: Sequence[str], canary: int, batch: Sequence[int | str]) -> list[list[str]]:
    """Canary batch first, then batches sized by `batch`; a ramp's last size repeats."""
    rest, out = list(hosts), []
    if canary > 0 and rest:
        out.append(rest[:canary])
        rest = rest[canary:]
    sizes = list(batch) or [1]
    i = 0
    while rest:
        size = batch_size(sizes[min(i, len(sizes) - 1)], len(hosts))
        out.append(rest[:size])
        rest = rest[size:]
        i += 1
    return out


def allowed_failures(max_failed: int | str, total: int) -> int:
    if isinstance(max_failed, int):
        return max_failed
    return math.floor(total * float(max_failed.rstrip("%")) / 100)


def release_name(sha: str, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d%H%M%S}-{sha[:7]}"


@dataclass(frozen=True)
class Plan:
    action: str  # "rollout" | "rollback"
    app: str
    revision: str | None
    targets: dict[str, str]  # host -> release it switches to
    batches: tuple[tuple[str, ...], ...]
    max_failed: int
    on_failure: str
    parallel: int

    @property
    def hosts(self) -> list[str]:
        return [h for b in self.batches for h in b]

    def render(self) -> str:
        lines = [
            f"{self.action} of {self.app}"
            + (f" at {self.revision}" if self.revision else "")
            + f" to {len(self.hosts)} host(s)",
        ]
        if self.action == "rollout":
            lines.append(
                f"  1. lock; prepare {', '.join(self.hosts)} "
                f"(at most {self.parallel} at once): sync, release, link shared, build"
            )
            lines.append("  2. migrations: expand")
        for i, b in enumerate(self.batches, 1):
            label = "canary batch" if i == 1 and len(self.batches) > 1 else f"batch {i}"
            moves = ", ".join(f"{h} -> {self.targets[h]}" for h in b)
            lines.append(f"  switch {label}: {moves}; reload master; check health")
        if self.action == "rollout":
            lines.append("  3. migrations: contract; prune old releases; record history")
        lines.append(f"  on failure: {self.on_failure} (hosts allowed to fail: {self.max_failed})")
        return "\n".join(lines)


# --- output ---------------------------------------------------------------------------


class Reporter:
    """Plain timestamped lines: safe in a git hook, CI or a log file."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def close(self) -> None:
        pass

    def say(self, text: str, host: str | None = None) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        prefix = f"{stamp} {host:<12} " if host else f"{stamp} "
        with self._lock:
            for line in text.splitlines() or [""]:
                self.stream.write(prefix + line + "\n")
            self.stream.flush()


class LiveReporter(Reporter):
    """On a terminal: a live table of hosts (last step, elapsed), log lines above it."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        super().__init__()
        self.console = Console()
        self.started = time.monotonic()
        self.rows: dict[str, tuple[str, float]] = {}
        self.live = Live(self._table(), console=self.console, refresh_per_second=4)
        self.live.start()

    def _table(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, show_header=True, header_style="bold")
        for column in ("host", "step", "since"):
            table.add_column(column)
        now = time.monotonic()
        for host, (text, since) in self.rows.items():
            style = "red" if "FAIL" in text else "green" if "healthy" in text else ""
            table.add_row(host, Text(text, style=style), f"{now - since:.1f}s")
        return table

    def say(self, text: str, host: str | None = None) -> None:
        with self._lock:
            if host is not None:
                self.rows[host] = (text.splitlines()[0][:100] if text else "", time.monotonic())
            stamp = dt.datetime.now().strftime("%H:%M:%S")
            self.live.console.print(f"{stamp} {host or '':<12} {text}", markup=False)
            self.live.update(self._table())

    def close(self) -> None:
        self.live.stop()


def reporter_for(stream: TextIO | None = None) -> Reporter:
    """Live view on a terminal; plain timestamped lines anywhere else (hooks, CI)."""
    stream = stream or sys.stdout
    if stream.isatty() and os.environ.get("TERM") != "dumb":
        return LiveReporter()
    return Reporter(stream)


# --- execution ------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    failed: dict[str, str] = field(default_factory=dict)  # host -> why
    step: str | None = None
    releases: dict[str, str | None] = field(default_factory=dict)  # host -> release it runs

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED


class Deploy:
    """One rollout or rollback over a set of hosts, under the deploy lock."""

    def __init__(
        self,
        inventory: Inventory,
        hosts: list[HostConfig],
        state_dir: Path,
        reporter: Reporter | None = None,
        lock_wait: float = 0.0,
    ) -> None:
        self.inventory = inventory
        self.reporter = reporter or reporter_for()
        self.state_dir = state_dir
        self.lock_wait = lock_wait
        self.pool = HostPool()
        self.remotes = {h.name: RemoteHost(h, self.pool.get(h)) for h in hosts}
        self.history = History(state_dir)

    # helpers

    def each(
        self, names: Sequence[str], fn: Callable[[RemoteHost], Any], limit: int | None = None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """fn on each host in parallel: (results, failures) keyed by host name."""
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        if not names:
            return results, failures
        workers = min(len(names), limit or self.inventory.rollout.parallel)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {n: pool.submit(fn, self.remotes[n]) for n in names}
            for name, fut in futures.items():
                try:
                    results[name] = fut.result()
                except DeployerError as e:
                    # The host is named once, by the report line itself.
                    failures[name] = str(e).removeprefix(f"{name}: ")
                    self.reporter.say(f"FAILED: {failures[name]}", name)
        return results, failures

    def remote(self, name: str) -> RemoteHost:
        """An inventory host outside the selection (e.g. the migrations host)."""
        config = self.inventory.hosts[name]
        return RemoteHost(config, self.pool.get(config))

    def close(self) -> None:
        self.reporter.close()
        self.pool.close()

    # locking

    def locked(self, owner: Owner) -> _Locks:
        return _Locks(self, owner)

    # the switch of one host

    def switch_host(self, remote: RemoteHost, release: str) -> None:
        say = self.reporter.say
        t0 = time.monotonic()
        remote.switch(release)
        say(f"switch: current -> {release}", remote.name)
        t1 = time.monotonic()
        self.reload(remote)
        t2 = time.monotonic()
        result = remote.health()
        t3 = time.monotonic()
        probes = f", {result['probes']} probe(s)" if result else " (no [health] configured)"
        say(
            f"healthy{probes}; switch {t1 - t0:.2f}s, reload {t2 - t1:.2f}s, health {t3 - t2:.2f}s",
            remote.name,
        )

    def reload(self, remote: RemoteHost) -> None:
        if remote.config.master is None:
            return
        if not remote.state()["master"]["running"]:
            self.reporter.say("master not running: starting it", remote.name)
            remote.start_master(on_line=lambda s: self.reporter.say(f"master: {s}", remote.name))
            return
        remote.reload_master(on_line=lambda s: self.reporter.say(f"reload: {s}", remote.name))

    def revert(self, before: dict[str, str | None], names: Sequence[str]) -> dict[str, str]:
        """Put hosts back on the release they ran before, the same careful way."""
        targets = [n for n in names if before.get(n)]
        for n in names:
            if not before.get(n):
                self.reporter.say("no previous release to go back to: left as is", n)
        _, failures = self.each(targets, lambda r: self.switch_host(r, before[r.name]))
        for n in targets:
            if n not in failures:
                self.reporter.say(f"rolled back to {before[n]}", n)
        return failures

    def record(self, entry: dict[str, Any], names: Sequence[str]) -> None:
        self.history.append(entry)
        self.each(names, lambda r: r.record(entry))


class _Locks:
    """Controller lock + a lock on every host, with a heartbeat; released on every exit."""

    def __init__(self, deploy: Deploy, owner: Owner) -> None:
        self.deploy = deploy
        self.owner = owner
        self.controller = ControllerLock(deploy.state_dir, owner.app)
        self.held: list[str] = []
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> _Locks:
        self.controller.acquire(self.owner, wait=self.deploy.lock_wait)
        try:
            self._acquire_hosts()
        except BaseException:
            self._release()
            raise
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat")
        self._beat.start()
        return self

    def _acquire_hosts(self) -> None:
        owner = self.owner.to_dict()
        results, failures = self.deploy.each(
            list(self.deploy.remotes), lambda r: r.lock("acquire", owner)
        )
        self.held = [n for n, res in results.items() if res.get("acquired")]
        busy = {n: res["holder"] for n, res in results.items() if not res.get("acquired")}
        if busy:
            name, holder = next(iter(busy.items()))
            raise LockHeld(describe(holder, f"host {name}"))
        if failures:
            name, why = next(iter(failures.items()))
            raise StepFailed(name, "lock", why)

    def _heartbeat(self) -> None:
        owner = self.owner.to_dict()
        while not self._stop.wait(HEARTBEAT_S):
            self.controller.heartbeat()
            for name in self.held:
                # Quietly: a host that is down is reported by the step that needs it.
                with contextlib.suppress(DeployerError):
                    self.deploy.remotes[name].lock("heartbeat", owner)

    def _release(self) -> None:
        self._stop.set()
        owner = self.owner.to_dict()
        if self.held:
            self.deploy.each(self.held, lambda r: r.lock("release", owner))
        self.controller.release(self.owner)

    def __exit__(self, *exc: object) -> None:
        self._release()


def check_agents(deploy: Deploy, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """State of each host, refusing an agent of another version than ours."""
    from deployer.agent.bundle import build

    ours = build().id

    def check(remote: RemoteHost) -> dict[str, Any]:
        state = remote.state()  # carries the agent's bundle id: one call for both
        theirs = state.get("bundle")
        if theirs != ours:
            raise StepFailed(
                remote.name,
                "version check",
                f"host agent is {theirs or 'an older one'}, this controller is {ours}: "
                "run `deployer setup`",
            )
        return state

    return deploy.each(names, check)


def reject_missing_release(states: dict[str, Any], targets: dict[str, str]) -> None:
    missing = [
        f"{n} (has: {', '.join(r['name'] for r in states[n]['releases']) or 'none'})"
        for n, rel in targets.items()
        if rel not in {r["name"] for r in states[n]["releases"]}
    ]
    if missing:
        raise BadInput(
            f"release {next(iter(targets.values()))} does not exist on: {'; '.join(missing)}"
        )


# --- the two flows --------------------------------------------------------------------


def plan_rollout(
    inventory: Inventory,
    names: Sequence[str],
    sha: str,
    batch: tuple[int | str, ...] | None = None,
    canary: int | None = None,
) -> Plan:
    r = inventory.rollout
    release = release_name(sha)
    return Plan(
        action="rollout",
        app=inventory.app.name,
        revision=sha,
        targets={n: release for n in names},
        batches=tuple(
            tuple(b)
            for b in split_batches(names, r.canary if canary is None else canary, batch or r.batch)
        ),
        max_failed=allowed_failures(r.max_failed, len(names)),
        on_failure=r.on_failure,
        parallel=r.parallel,
    )


def run_rollout(
    deploy: Deploy, plan: Plan, source: Any, deploy_id: str | None = None, log: str | None = None
) -> Outcome:
    """Execute a rollout plan; the caller holds nothing, this takes the locks.

    `deploy_id` names the rollout (history, lock owner) when the caller already
    told someone its name (the post-update hook names the log after it)."""
    from deployer.sync import pack_for_host

    say = deploy.reporter.say
    release = next(iter(plan.targets.values()))
    owner = Owner(plan.app, plan.revision or "", "rollout")
    if deploy_id:
        owner = replace(owner, id=deploy_id)
    started = time.monotonic()
    entry: dict[str, Any] = {
        "id": deploy_id or f"{release}-{owner.id[:4]}",
        "log": log,
        "action": "rollout",
        "revision": plan.revision,
        "release": release,
        "user": owner.user,
        "controller": owner.controller,
        "started": owner.since,
        "hosts": plan.hosts,
    }
    outcome = Outcome(ok=False)
    with deploy.locked(owner):
        say(f"rollout {plan.revision} as {release} to {', '.join(plan.hosts)}")
        states, failed = check_agents(deploy, plan.hosts)
        before = {n: s["current"] for n, s in states.items()}
        outcome.releases = dict(before)

        revision = source.resolve(plan.revision)  # once: GitPython is not thread-safe

        def prepare(remote: RemoteHost) -> None:
            t0 = time.monotonic()
            pack = pack_for_host(source, revision, states[remote.name]["have"])
            remote.prepare(
                plan.revision or "", release, pack, on_line=lambda s: say(s, remote.name)
            )
            say(
                f"prepared: sent {len(pack or b'')} bytes, release ready in "
                f"{time.monotonic() - t0:.2f}s",
                remote.name,
            )

        _, prep_failed = deploy.each([n for n in plan.hosts if n not in failed], prepare)
        failed.update(prep_failed)
        if len(failed) > plan.max_failed:
            return _finish(
                deploy, entry, outcome, failed, "prepare", started, "no host was switched"
            )
        try:
            run_migrations(deploy, "contract", "current", deferred=True)
            run_migrations(deploy, "expand", release)
        except DeployerError as e:
            return _finish(
                deploy,
                entry,
                outcome,
                {"migrations": str(e)},
                "expand",
                started,
                "no host was switched",
            )
        switched: list[str] = []
        try:
            for batch in plan.batches:
                todo = [n for n in batch if n not in failed]
                _, bad = deploy.each(todo, lambda r: deploy.switch_host(r, release))
                switched += [n for n in todo if n not in bad]
                for n in todo:
                    outcome.releases[n] = release
                failed.update(bad)
                if len(failed) > plan.max_failed:
                    return _abort(
                        deploy, plan, entry, outcome, failed, before, switched + list(bad), started
                    )
                if bad:  # tolerated: those hosts go back and stay out of the rollout
                    deploy.revert(before, list(bad))
                    for n in bad:
                        outcome.releases[n] = before.get(n)
        except KeyboardInterrupt:
            say("interrupted: putting switched hosts back")
            _abort(
                deploy,
                plan,
                entry,
                outcome,
                {"interrupted": "Ctrl-C or SIGTERM"},
                before,
                switched,
                started,
            )
            raise
        try:
            run_migrations(deploy, "contract", release)
        except DeployerError as e:
            # Contract only ever follows healthy hosts: they stay on the new code.
            failed["migrations"] = str(e)
            note = "hosts stay on the new release (safe: contract runs last)"
            return _finish(deploy, entry, outcome, failed, "contract", started, note)
        _, prune_failed = deploy.each(switched, lambda r: r.prune())
        for n, why in prune_failed.items():
            say(f"warning: prune failed: {why}", n)
        outcome.ok = True
        outcome.failed = failed
        return _finish(deploy, entry, outcome, failed, None, started, None)


def _abort(
    deploy: Deploy,
    plan: Plan,
    entry: dict[str, Any],
    outcome: Outcome,
    failed: dict[str, str],
    before: dict[str, str | None],
    touched: list[str],
    started: float,
) -> Outcome:
    if plan.on_failure == "rollback":
        deploy.reporter.say(f"rolling back {', '.join(touched) or 'nothing'}")
        still = deploy.revert(before, touched)
        for n in touched:
            if n not in still:
                outcome.releases[n] = before.get(n)
        note = "switched hosts rolled back" + (
            f"; rollback FAILED on {', '.join(still)}" if still else ""
        )
    else:
        note = "halted: " + ", ".join(f"{n} runs {r}" for n, r in outcome.releases.items())
    return _finish(deploy, entry, outcome, failed, "switch", started, note)


def _finish(
    deploy: Deploy,
    entry: dict[str, Any],
    outcome: Outcome,
    failed: dict[str, str],
    step: str | None,
    started: float,
    note: str | None,
) -> Outcome:
    outcome.failed = failed
    outcome.step = step
    entry.update(
        result="ok" if outcome.ok else "failed",
        failed_step=step,
        failures=failed,
        note=note,
        duration_s=round(time.monotonic() - started, 2),
        releases=outcome.releases,
    )
    try:
        deploy.record(entry, [n for n in deploy.remotes if n not in failed])
    except DeployerError as e:
        deploy.reporter.say(f"warning: could not record history: {e}")
    say = deploy.reporter.say
    if outcome.ok:
        say(
            f"{entry['action']} ok in {entry['duration_s']}s: "
            + ", ".join(f"{n} on {r}" for n, r in outcome.releases.items())
        )
    else:
        say(
            f"{entry['action']} FAILED at {step} after {entry['duration_s']}s"
            + (f": {note}" if note else "")
        )
    if failed and outcome.ok:
        say(f"{len(failed)} host(s) failed within max_failed and stay on their old release:")
    for n, why in failed.items():
        say(f"  {n}: {why}")
    return outcome


def plan_rollback(inventory: Inventory, states: dict[str, Any], to: str | None) -> Plan:
    targets: dict[str, str] = {}
    missing: list[str] = []
    for name, st in states.items():
        target = to or st["previous"]
        if target is None:
            missing.append(f"{name} (no release before {st['current']})")
        else:
            targets[name] = target
    if missing:
        raise BadInput("nothing to roll back to on: " + "; ".join(missing))
    if to:
        reject_missing_release(states, targets)
    r = inventory.rollout
    names = list(targets)
    return Plan(
        action="rollback",
        app=inventory.app.name,
        revision=None,
        targets=targets,
        batches=tuple(tuple(b) for b in split_batches(names, r.canary, r.batch)),
        max_failed=0,
        on_failure="halt",
        parallel=r.parallel,
    )


def run_rollback(
    deploy: Deploy, to: str | None, dry_run: bool, force: bool = False, migrations: bool = False
) -> tuple[Plan, Outcome | None]:
    from deployer import schema

    names = list(deploy.remotes)
    owner = Owner(deploy.inventory.app.name, to or "previous", "rollback")
    with deploy.locked(owner):
        states, failed = check_agents(deploy, names)
        if failed:
            raise StepFailed(next(iter(failed)), "state", next(iter(failed.values())))
        plan = plan_rollback(deploy.inventory, states, to)
        oldest = min(plan.targets.values())
        rows = schema.applied(deploy)
        left = schema.check_rollback(rows, oldest, force)
        if left:
            deploy.reporter.say(
                "migrations applied by the releases being left: "
                + "; ".join(left)
                + ("" if migrations else " (they stay applied; --migrations reverts expand ones)")
            )
        if dry_run:
            return plan, None
        started = time.monotonic()
        before = {n: s["current"] for n, s in states.items()}
        entry: dict[str, Any] = {
            "id": f"{release_name(owner.id)}-rb",
            "action": "rollback",
            "revision": None,
            "release": to,
            "user": owner.user,
            "controller": owner.controller,
            "started": owner.since,
            "hosts": names,
        }
        outcome = Outcome(ok=False, releases=dict(before))
        for batch in plan.batches:
            _, bad = deploy.each(batch, lambda r: deploy.switch_host(r, plan.targets[r.name]))
            for n in batch:
                outcome.releases[n] = plan.targets[n]
            if bad:
                deploy.revert(before, list(bad))
                for n in bad:
                    outcome.releases[n] = before[n]
                return plan, _finish(
                    deploy,
                    entry,
                    outcome,
                    bad,
                    "switch",
                    started,
                    "halted; failed hosts returned to where they were",
                )
        if migrations and left:
            try:
                newer = [r["release"] for r in rows if (r.get("release") or "") > oldest]
                schema.down_expand(deploy, newer)
            except DeployerError as e:
                return plan, _finish(
                    deploy,
                    entry,
                    outcome,
                    {"migrations": str(e)},
                    "migrations down",
                    started,
                    "hosts are back; schema is not",
                )
        outcome.ok = True
        return plan, _finish(deploy, entry, outcome, {}, None, started, None)
