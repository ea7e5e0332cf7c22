"""The plan of a rollout or a rollback: pure data (which hosts, in which batches,
to which release, how many may fail), printable with --dry-run; deployer.rollout
carries it out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from deployer.errors import BadInput
from deployer.hostapi.answers import HostState
from deployer.hostapi.layout import release_name
from deployer.inventory import Inventory


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
    # seconds from its switch the first batch (the canary) is watched before any other
    # host switches; later batches are looked at again as the next ones switch
    watch: float = 0.0

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
            watch = f"; watch {self.watch:g}s from its switch" if self.watch and i == 1 else ""
            lines.append(f"  switch {label}: {moves}; reload master; check health{watch}")
        if len(self.batches) > 1 or not self.watch:
            lines.append(
                "  after each later batch and at the end: every switched host looked at "
                "again (a crash since its switch, a worker not ready, a failing probe)"
            )
        if self.action == "rollout":
            lines.append("  3. migrations: contract; prune old releases; record history")
        lines.append(f"  on failure: {self.on_failure} (hosts allowed to fail: {self.max_failed})")
        return "\n".join(lines)


def reject_missing_release(states: dict[str, HostState], targets: dict[str, str]) -> None:
    missing = [
        f"{n} (has: {', '.join(states[n].release_names) or 'none'})"
        for n, rel in targets.items()
        if rel not in states[n].release_names
    ]
    if missing:
        raise BadInput(
            f"release {next(iter(targets.values()))} does not exist on: {'; '.join(missing)}"
        )


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
        watch=r.watch,
    )


def plan_rollback(inventory: Inventory, states: dict[str, HostState], to: str | None) -> Plan:
    targets: dict[str, str] = {}
    missing: list[str] = []
    for name, st in states.items():
        target = to or st.previous
        if target is None:
            missing.append(f"{name} (no release before {st.current})")
        else:
            targets[name] = target
    if missing:
        raise BadInput("nothing to roll back to on: " + "; ".join(missing))
    if to:
        reject_missing_release(states, targets)
    r = inventory.rollout
    names = list(targets)
    # Back to releases these hosts ran: no canary, and no watch to wait out (the
    # batches keep the fleet's capacity); every host is looked at again at the end.
    return Plan(
        action="rollback",
        app=inventory.app.name,
        revision=None,
        targets=targets,
        batches=tuple(tuple(b) for b in split_batches(names, 0, r.batch)),
        max_failed=0,
        on_failure="halt",
        parallel=r.parallel,
    )
