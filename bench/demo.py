"""How long `deployer demo` takes, and what its load saw (target: < 60 s, 0 failed).

    python bench/demo.py [--runs 3]

Each run is the README's first command's main job, as a fresh process in a
fresh temporary directory: init, setup, push v1, push v2 under load, summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def one_run() -> tuple[float, list[list[str]]]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "deployer", "demo"], capture_output=True, text=True, timeout=300
    )
    took = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"deployer demo exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("web")]
    return took, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    times, sent, failed = [], 0, 0
    for i in range(args.runs):
        took, rows = one_run()
        times.append(took)
        sent += sum(int(r[3]) for r in rows)
        failed += sum(int(r[4]) for r in rows)
        print(f"run {i + 1}: {took:.1f} s; " + "; ".join(
            f"{r[0]} {r[3]} requests, {r[4]} failed" for r in rows))  # fmt: skip
    print(
        f"`deployer demo` x{args.runs}: median {statistics.median(times):.1f} s "
        f"(min {min(times):.1f}, max {max(times):.1f}); target < 60 s; "
        f"{sent} requests during the v2 rollouts, {failed} failed; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
