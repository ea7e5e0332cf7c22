"""Cold start of `deployer --help`: median of N runs in fresh interpreters.

Target (issue 2): at most 0.25 s on the 2-core dev machine. Also checks that
`--help` imports none of fabric, paramiko, git or rich.

    python bench/cli_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("fabric", "paramiko", "git", "rich", "invoke")
TARGET_S = 0.25


def deployer_argv() -> list[str]:
    beside = Path(sys.executable).parent / "deployer"  # the venv's console script
    exe = str(beside) if beside.exists() else shutil.which("deployer")
    return [exe] if exe else [sys.executable, "-m", "deployer"]


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([*argv, "--help"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_imports() -> list[str]:
    code = (
        "import sys\n"
        "from deployer.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("HEAVY:"))
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    argv = deployer_argv()
    time_once(argv)  # warm the page cache and .pyc files: "cold" means a new process
    times = [time_once(argv) for _ in range(args.runs)]
    median = statistics.median(times)
    heavy = heavy_imports()
    print(f"command: {' '.join(argv)} --help")
    print(
        f"runs: {args.runs}  median: {median:.3f} s  "
        f"min: {min(times):.3f} s  max: {max(times):.3f} s"
    )
    print(f"heavy modules imported by --help: {', '.join(heavy) or 'none'}")
    ok = median <= TARGET_S and not heavy
    print(f"target: median <= {TARGET_S} s and no heavy imports: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
