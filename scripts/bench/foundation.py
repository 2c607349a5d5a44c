#!/usr/bin/env python3
"""Benchmarks of the foundation: CLI start-up, cold and warm install, status.

Runs a whole platform in a fresh working directory on free ports (artifacts from the
cache, as after scripts/setup), then purges it. Prints a markdown table for
docs/BENCHMARKS.md.

Usage: .venv/bin/python scripts/bench/foundation.py [--help-runs 20] [--repeat 5] [--baseline REV]

--baseline REV measures that revision first, in the same run (scripts/bench/baseline.py:
its tree with this checkout's installed packages), then this checkout.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integration.conftest import Workdir, port_override, reachable_dir  # noqa: E402

OPSCTL = str(Path(sys.executable).with_name("opsctl"))


def timed(work: Workdir, *args: str) -> float:
    started = time.perf_counter()
    result = work.run(*args)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"opsctl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--help-runs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", metavar="REV", help="Also measure this revision, first, in the same run.")
    args = parser.parse_args()
    if args.baseline:
        from scripts.bench.baseline import run_at

        print(f"baseline {args.baseline}:\n")
        print(run_at(args.baseline, "scripts/bench/foundation.py", "--help-runs", str(args.help_runs),
                     "--repeat", str(args.repeat)))
        print("this checkout:\n")

    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    rows = []
    try:
        # The console script itself, as a user types it (not python -m).
        helps = []
        for _ in range(args.help_runs):
            started = time.perf_counter()
            subprocess.run([OPSCTL, "--help"], capture_output=True, check=True)
            helps.append(time.perf_counter() - started)
        rows.append(("`opsctl --help`", helps, "< 0.3 s"))
        rows.append(("`opsctl install`, cold (artifacts cached)", [timed(work, "install")], "< 180 s"))
        rows.append(("`opsctl install`, warm (nothing to do)",
                     [timed(work, "install") for _ in range(args.repeat)], "< 5 s"))
        rows.append(("`opsctl status`", [timed(work, "status") for _ in range(args.repeat)], "< 2 s"))
    finally:
        work.run("down", "--purge", "--yes", timeout=300)
        shutil.rmtree(work.path, ignore_errors=True)

    print("| what | runs | median | max | target |")
    print("|---|---|---|---|---|")
    for what, times, target in rows:
        print(f"| {what} | {len(times)} | {statistics.median(times):.2f} s | {max(times):.2f} s | {target} |")


if __name__ == "__main__":
    main()
