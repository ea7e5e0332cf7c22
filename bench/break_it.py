"""Break the product on purpose, one line at a time, and check that a test notices.

Each row below is one promise of the product, one small edit that breaks it
(a search/replace in one file) and the tests that must then fail. For each row
the script copies the tree to a temporary directory (by default the files of
the commit HEAD, `git archive`; with --worktree the files `git ls-files` lists,
tracked and untracked-not-ignored, as they are on disk now), applies the edit
there, and runs the named tests from the copy with PYTHONPATH pointing at it,
so `deployer` (and every process a test starts: `python -m deployer`, the
masters, the host agent zipapp that `deployer setup` builds from the
controller's package) runs the broken copy; the script checks that `deployer`
imports from the copy. Nothing is installed and the checkout is never touched.

A row whose search text is not in its file (exactly once) stops the script
before any test runs: the list must follow the code, not rot silently.

    python bench/break_it.py                 # every row, after a baseline run
    python bench/break_it.py --only halt ready-soak --no-baseline
    python bench/break_it.py --worktree      # the files on disk, uncommitted edits included
    python bench/break_it.py --list

Result per row: "caught" (a named test failed: which ones, and the first
assertion of the first failure), "NOT CAUGHT" (they all passed), or "error"
(pytest could not run them: the break made something not importable, which is
not catching it for a reason). Exit code 0 only if every row is caught (and
the baseline passed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GR = "tests/test_guarantees_rollout.py::"
GM = "tests/test_guarantees_master.py::"
GP = "tests/test_guarantees_plan.py::"


@dataclass(frozen=True)
class Break:
    name: str
    promise: str
    path: str  # file to edit, relative to the repository root
    search: str
    replace: str
    tests: tuple[str, ...]


BREAKS = [
    # --- the table of issue 18 ---
    Break(
        "max-failed-revert",
        "a host whose switch fails within max_failed goes back to its old release",
        "deployer/rollout.py",
        "if bad:  # tolerated: those hosts go back and stay out of the rollout",
        "if False:  # tolerated: those hosts go back and stay out of the rollout",
        (
            GR + "test_host_failing_its_switch_within_max_failed_goes_back_to_its_old_release",
            GP + "test_a_host_failing_within_max_failed_goes_back_and_the_rollout_goes_on",
        ),
    ),
    Break(
        "halt",
        'on_failure = "halt" stops where it is (does not roll back)',
        "deployer/rollout.py",
        'if plan.on_failure == "rollback":',
        "if True:",
        (
            GR + "test_on_failure_halt_stops_where_it_is",
            GP + "test_halt_leaves_every_host_where_it_is",
        ),
    ),
    Break(
        "batch-round-up",
        "percentage batch sizes are rounded up",
        "deployer/plan.py",
        'return max(1, math.ceil(total * float(spec.rstrip("%")) / 100))',
        'return max(1, math.floor(total * float(spec.rstrip("%")) / 100))',
        (
            "tests/test_contract.py::test_batches_round_percentages_up",
            "tests/test_contract.py::test_plan_rollout_from_an_inventory",
            GP + "test_batch_size_rounds_percentages_up",
        ),
    ),
    Break(
        "rollback-halts",
        "`deployer rollback` stops at a host that failed",
        "deployer/rollout.py",
        "                return plan, _finish(\n"
        "                    fleet,\n"
        "                    entry,\n"
        "                    outcome,\n"
        "                    bad,",
        "                plan, _finish(\n"
        "                    fleet,\n"
        "                    entry,\n"
        "                    outcome,\n"
        "                    bad,",
        (
            GR + "test_rollback_halts_at_a_host_that_fails",
            GP + "test_rollback_halts_at_the_first_host_that_fails",
        ),
    ),
    Break(
        "deferred-contract",
        'contract = "next-rollout": deferred contract migrations run at the next rollout',
        "deployer/migrating.py",
        'if deferred and m.contract != "next-rollout":',
        "if deferred:",
        (
            GR + "test_deferred_contract_migrations_run_at_the_start_of_the_next_rollout",
            GP + "test_contract_next_rollout_runs_the_running_releases_contract_first",
        ),
    ),
    Break(
        "backoff-cap",
        "the crash backoff is capped (30 s)",
        "deployer/master/slots.py",
        "return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (streak - 2) * random.uniform(0.8, 1.2))",
        "return BACKOFF_BASE * 2 ** (streak - 2) * random.uniform(0.8, 1.2)",
        (GM + "test_crash_loop_backoff_grows_and_stops_at_its_cap",),
    ),
    Break(
        "ready-soak",
        "an old worker drains only once its replacement stayed up ready_soak",
        "deployer/master/reload.py",
        "return now - w.ready_at >= self.cfg.ready_soak",
        "return now - w.ready_at >= 0",
        (GM + "test_old_worker_drains_only_after_the_replacement_stayed_up_ready_soak",),
    ),
    # --- the paragraph after it ---
    Break(
        "later-batch-rollback",
        "a later batch failing health rolls the earlier batches back",
        "deployer/rollout.py",
        "fleet, plan, entry, outcome, failed, before, on_new_release(), started",
        "fleet, plan, entry, outcome, failed, before, list(bad), started",
        (
            GR + "test_later_batch_failing_health_rolls_earlier_batches_back",
            GP + "test_a_later_batch_failing_rolls_the_earlier_batches_back",
        ),
    ),
    Break(
        "drain-after-ready",
        "an old worker drains only after its replacement is ready",
        "deployer/master/reload.py",
        "if self.soaked(slot.replacement, now):",
        "if slot.replacement is not None:",
        (GM + "test_old_worker_serves_until_its_replacement_is_ready",),
    ),
    Break(
        "death-in-soak",
        "a replacement that dies during its soak aborts the reload",
        "deployer/master/arbiter.py",
        "elif slot is not None and slot.replacement is worker:",
        "elif slot is not None and slot.replacement is worker and worker.ready_at is None:",
        (GM + "test_replacement_dying_during_its_soak_aborts_the_reload",),
    ),
    Break(
        "reload-batch",
        "reload_batch replacements boot at a time",
        "deployer/master/reload.py",
        "batch = checks.share_of(self.cfg.reload_batch, len(self.slots))",
        "batch = 1",
        (GM + "test_reload_batch_boots_that_many_replacements_at_a_time",),
    ),
    Break(
        "sigttin",
        "SIGTTIN adds a worker",
        "deployer/master/arbiter.py",
        "self.set_target(self.target + 1)",
        "self.set_target(self.target)",
        (GM + "test_sigttin_adds_a_worker_and_sigttou_removes_one",),
    ),
    Break(
        "sigttou-floor",
        "SIGTTOU removes a worker, never the last one",
        "deployer/master/arbiter.py",
        "self.set_target(max(1, self.target - 1))",
        "self.set_target(max(0, self.target - 1))",
        (GM + "test_sigttin_adds_a_worker_and_sigttou_removes_one",),
    ),
    Break(
        "stale-by-heartbeat",
        "a lock whose heartbeat is older than STALE_AFTER_S is stale",
        "deployer/lock.py",
        "beat = holder.heartbeat",
        "beat = None",
        (
            GR + "test_a_lock_whose_heartbeat_is_too_old_is_stale_and_unlock_breaks_it",
            GP + "test_stale_by_heartbeat_age",
        ),
    ),
    # --- promises whose tests no longer read the tool's own log lines ---
    Break(
        "delta-sync",
        "only the git objects a host lacks cross the network (bytes counted on the wire)",
        "deployer/rollout.py",
        "pack = pack_for_host(source, revision, states[remote.name].have)",
        "pack = pack_for_host(source, revision, [])",
        ("tests/test_rollout.py::test_delta_sync_sends_less_the_second_time",),
    ),
    Break(
        "contract-after-switch",
        "contract migrations run only after every host switched (seen from the hosts)",
        "deployer/rollout.py",
        '            run_migrations(fleet, "expand", release)\n',
        '            run_migrations(fleet, "expand", release)\n'
        '            run_migrations(fleet, "contract", release)\n',
        (
            "tests/test_rollout.py::test_expand_before_switch_contract_after",
            GP + "test_expand_before_the_first_switch_contract_after_the_last",
        ),
    ),
]


def pristine_copy(root: Path, dest: Path, worktree: bool, rev: str) -> None:
    """The tree to break: the files of `rev`, or those on disk (--worktree)."""
    dest.mkdir(parents=True)
    if not worktree:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "--format=tar", rev],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    for f in out.decode().split("\0"):
        # mutants/: mutmut's work directory, not part of the product
        if not f or f.startswith("mutants/") or not (root / f).is_file():
            continue
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, target, follow_symlinks=False)


def apply(dest: Path, b: Break) -> None:
    path = dest / b.path
    text = path.read_text()
    n = text.count(b.search)
    if n != 1:
        raise SystemExit(f"{b.name}: the search text occurs {n} times in {b.path}")
    path.write_text(text.replace(b.search, b.replace))


def check_rows(tree: Path, rows: list[Break]) -> None:
    """Fail loudly, before running anything, if a row no longer matches the code."""
    bad = []
    for b in rows:
        path = tree / b.path
        if not path.exists():
            bad.append(f"{b.name}: {b.path} does not exist")
            continue
        n = path.read_text().count(b.search)
        if n != 1:
            bad.append(f"{b.name}: search text found {n} times in {b.path}: {b.search!r}")
        for t in b.tests:
            if not (tree / t.split("::")[0]).exists():
                bad.append(f"{b.name}: no test file {t}")
    if bad:
        raise SystemExit("break list out of date:\n  " + "\n  ".join(bad))


def env_for(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_copy(copy: Path) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import deployer; print(deployer.__file__)"],
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"`deployer` imports from {where}, not from the copy {copy}")


def run_tests(copy: Path, tests: tuple[str, ...] | list[str]) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
        cwd=copy,
        env=env_for(copy),
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def why_failed(output: str) -> str:
    """Which named tests failed, and the first assertion of the first failure."""
    failed = [m.group(1).split("::")[-1] for m in re.finditer(r"^FAILED (\S+)", output, re.M)]
    lines = [m.group(1).strip() for m in re.finditer(r"^E +(.*)$", output, re.M)]
    # the comparison pytest explains ("assert ..."), else the first message line
    shown = next((x for x in lines if x.startswith("assert ")), lines[0] if lines else "")
    first = next((x for x in lines if x), "")
    if first != shown:
        shown = f"{first[:160]} / {shown}"
    return f"{', '.join(failed)}: {shown[:320]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unbroken run")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--keep", action="store_true", help="keep the copies (their paths)")
    parser.add_argument("--rev", default="HEAD", help="commit to break (default HEAD)")
    parser.add_argument("--worktree", action="store_true", help="break the files on disk")
    args = parser.parse_args()
    rows = [b for b in BREAKS if not args.only or b.name in args.only]
    unknown = set(args.only or ()) - {b.name for b in BREAKS}
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}")
    base = Path(tempfile.mkdtemp(prefix="break-it-"))
    pristine = base / "pristine"
    ok = True
    try:
        pristine_copy(ROOT, pristine, args.worktree, args.rev)
        check_rows(pristine, rows)
        if args.list:
            for b in rows:
                print(f"{b.name:22} {b.path:28} {b.promise}")
            return 0
        source = "the work tree" if args.worktree else args.rev
        print(f"breaking a copy of {source} in {base}")
        if not args.no_baseline:
            check_imports_copy(pristine)
            tests = sorted({t for b in rows for t in b.tests})
            code, out, took = run_tests(pristine, tests)
            print(f"baseline (nothing broken): {len(tests)} tests, exit {code}, {took:.0f}s")
            if code != 0:
                print(out[-3000:])
                return 1
        print()
        print("| row | broken on purpose | file | result | failed, and why |")
        print("|---|---|---|---|---|")
        for b in rows:
            copy = base / b.name
            shutil.copytree(pristine, copy, symlinks=True)
            apply(copy, b)
            check_imports_copy(copy)
            code, out, took = run_tests(copy, b.tests)
            if code == 1:
                result, why = "caught", why_failed(out)
            elif code == 0:
                result, why, ok = "NOT CAUGHT", "all passed", False
            else:
                result, why, ok = "error", f"pytest exit {code}: {out.strip()[-300:]}", False
            why = why.replace("|", "\\|").replace("\n", " ")
            print(f"| {b.name} | {b.promise} | {b.path} | {result} ({took:.0f}s) | {why} |")
            sys.stdout.flush()
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
    finally:
        if args.keep:
            print(f"copies kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
