"""How long a deploy takes with the default settings (issue 24, item 5).

N real sshd hosts on loopback (tests/sshd.py, as the tests start them), the example
Python app made ready 1 s after it starts (BOOT_DELAY=1), and an inventory that sets
only what an app must ([master] command, listen, ready; [health] url): every other
setting (batches, canary, watch, ready_soak, health passes) is deployer's default.
While a bounded load generator keeps every host busy, it times:

  redeploy   `deployer rollout` of a one-line change (after a first deploy)
  rollback   `deployer rollback` to the release before
  crash      a release whose workers exit 3 s after ready: the canary's watch must
             catch it and roll back, with 0 failed requests on the other hosts

Targets (issue 24, item 5): 2 hosts: redeploy <= 8 s, rollback <= 5 s; 8 hosts:
redeploy <= 12 s; crash rolled back, 0 failed requests on the hosts that were not
the canary.

    python bench/deploy_time.py [--hosts 2] [--runs 3] [--json FILE]

Needs root (a dedicated login user for the sshd hosts). Loopback only; every sshd
and master it starts is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from master_helpers import free_port  # noqa: E402
from rollout_helpers import APP, commit, make_project, stop_masters  # noqa: E402
from sshd import SSHDFleet  # noqa: E402

from deployer.loadgen import Load  # noqa: E402

TARGETS = {2: {"redeploy": 8.0, "rollback": 5.0}, 8: {"redeploy": 12.0}}


def inventory_extra(port: int) -> str:
    """Only what an app must say; the rest is deployer's default."""
    return (
        f'[master]\ncommand = "python3 app.py"\nlisten = "{{address}}:{port}"\n'
        'ready = "notify"\n[env]\nBOOT_DELAY = "1"\n'
        f'[health]\nurl = "http://{{address}}:{port}/health"\n'
    )


SHOW = False  # --show: print each timed command's output


def timed(project, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.monotonic()
    proc = project.deployer(*args, timeout=900)
    seconds = time.monotonic() - began
    if SHOW:
        print(f"--- deployer {' '.join(args)}: {seconds:.2f} s, exit {proc.returncode}")
        print(proc.stdout + proc.stderr, flush=True)
    return seconds, proc


def under_load(project, port: int, *args: str):
    loads = [Load(port, threads=2, duration=600, address=h.address) for h in project.hosts]
    for load in loads:
        load.__enter__()
        load.wait_requests(10)
    try:
        seconds, proc = timed(project, *args)
    finally:
        results = [load.stop() for load in loads]
    return seconds, proc, [r.failed for r in results]


def one_run(fleet: SSHDFleet, n: int, work: Path) -> dict[str, object]:
    hosts = fleet.fresh_copies(fleet.hosts()[:n], label=f"bench{n}")
    port = free_port()
    project = make_project(work, hosts, {"app.py": APP}, extra=inventory_extra(port))
    try:
        project.deployer("setup", check=True)
        project.deployer("rollout", check=True)
        commit(project.repo, {"app.py": APP + "\n# v2\n"}, "v2")
        redeploy, proc, failed_redeploy = under_load(project, port, "rollout")
        assert proc.returncode == 0, proc.stdout[-3000:]
        rollback, proc, failed_rollback = under_load(project, port, "rollback")
        assert proc.returncode == 0, proc.stdout[-3000:]
        commit(
            project.repo, {"release.env": "CRASH_AFTER_READY=3\n"}, "v3: crashes 3 s after ready"
        )
        crash, proc, failed_crash = under_load(project, port, "rollout")
        caught = proc.returncode == 1 and "rolled back" in proc.stdout
        return {
            "hosts": n,
            "redeploy_s": round(redeploy, 2),
            "rollback_s": round(rollback, 2),
            "crash_s": round(crash, 2),
            "crash_rolled_back": caught,
            "failed_requests": {
                "redeploy": failed_redeploy,
                "rollback": failed_rollback,
                "crash_canary": failed_crash[0],
                "crash_others": sum(failed_crash[1:]),
            },
        }
    finally:
        stop_masters(hosts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--show", action="store_true", help="print each timed command's output")
    args = p.parse_args()
    global SHOW
    SHOW = args.show
    if os.geteuid() != 0:
        print("bench/deploy_time.py: needs root (the sshd hosts' login user)", file=sys.stderr)
        return 2
    fleet = SSHDFleet()
    rows = []
    try:
        fleet.start(args.hosts)
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="deploy-time-") as work:
                row = one_run(fleet, args.hosts, Path(work))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        fleet.kill_all()
        fleet.cleanup()
    print(f"\n{args.hosts} hosts, {args.runs} run(s), default settings, app ready after 1 s:")
    ok = True
    for key in ("redeploy_s", "rollback_s", "crash_s"):
        values = [float(r[key]) for r in rows]  # type: ignore[arg-type]
        target = TARGETS.get(args.hosts, {}).get(key[:-2])
        verdict = (
            "" if target is None else (" PASS" if statistics.median(values) <= target else " MISS")
        )
        ok &= verdict != " MISS"
        goal = "" if target is None else f"  target <= {target:g} s{verdict}"
        print(
            f"  {key[:-2]:<9} median {statistics.median(values):6.2f} s  (min {min(values):.2f},"
            f" max {max(values):.2f}){goal}"
        )
    caught = all(r["crash_rolled_back"] for r in rows)
    others = sum(r["failed_requests"]["crash_others"] for r in rows)  # type: ignore[index]
    failed = {
        k: sum(sum(r["failed_requests"][k]) for r in rows)  # type: ignore[index]
        for k in ("redeploy", "rollback")
    }
    print(
        f"  crash 3 s after ready rolled back in every run: {caught}; failed requests on the"
        f" other hosts: {others}; during redeploys: {failed['redeploy']},"
        f" rollbacks: {failed['rollback']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if ok and caught and others == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
