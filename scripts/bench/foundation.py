#!/usr/bin/env python3
"""Benchmarks of the foundation: CLI start-up, cold and warm install, status.

Runs a whole platform in a fresh working directory on free ports (artifacts from the
cache, as after scripts/setup), then purges it. Prints a markdown table for
docs/BENCHMARKS.md.

Usage: .venv/bin/python scripts/bench/foundation.py [--help-runs 20] [--repeat 5] [--baseline REV]

--baseline REV measures that revision first, in the same run: its tree (a git worktree in a
temporary folder) with this checkout's installed packages, through a throw-away virtual
environment whose path puts that tree first; then this checkout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integration.conftest import Workdir, cache_dir, port_override, reachable_dir  # noqa: E402

OPSCTL = str(Path(sys.executable).with_name("opsctl"))


def timed(work: Workdir, *args: str) -> float:
    started = time.perf_counter()
    result = work.run(*args)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"opsctl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return elapsed


def baseline(rev: str, help_runs: int, repeat: int) -> str:
    """The table of revision `rev`, measured by its own copy of this script."""
    repo = Path(__file__).resolve().parents[2]
    folder = Path(tempfile.mkdtemp(prefix="opsctl-baseline-"))
    folder.chmod(0o755)  # the servers' system users read nothing here, but may need to pass
    tree, env = folder / "tree", folder / "venv"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    try:
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", "--symlinks", str(env)], check=True)
        site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
        # That tree first, then this environment's packages (their editable finders come after).
        (site / "baseline.pth").write_text(f"{tree}\n{tree / 'services'}\n"
                                           f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
        (env / "bin" / "supervisord").symlink_to(Path(sys.executable).with_name("supervisord"))
        script = env / "bin" / "opsctl"
        script.write_text(f"#!{env / 'bin' / 'python'}\nfrom opsctl.cli import main\nmain()\n")
        script.chmod(0o755)
        return subprocess.run([str(env / "bin" / "python"), str(tree / "scripts" / "bench" / "foundation.py"),
                               "--help-runs", str(help_runs), "--repeat", str(repeat)], check=True,
                              capture_output=True, text=True, cwd=tree,
                              env={**os.environ, "OPSCTL_CACHE_DIR": cache_dir()}).stdout
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--help-runs", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", metavar="REV", help="Also measure this revision, first, in the same run.")
    args = parser.parse_args()
    if args.baseline:
        print(f"baseline {args.baseline}:\n")
        print(baseline(args.baseline, args.help_runs, args.repeat))
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
