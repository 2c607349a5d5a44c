#!/usr/bin/env python3
"""Benchmark of `opsctl token` against the local Keycloak (client secret read from Vault).

Installs only what a token needs (Vault, Keycloak, the realm) in a fresh working
directory on free ports, times the command, then purges.

Usage: .venv/bin/python scripts/bench/token_latency.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integration.conftest import Workdir, port_override, reachable_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    try:
        result = work.run("install", "--only", "vault,keycloak,keycloak-realm")
        if result.returncode != 0:
            sys.exit(result.stderr)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            result = work.run("token")
            times.append(time.perf_counter() - started)
            if result.returncode != 0:
                sys.exit(result.stderr)
    finally:
        work.run("down", "--purge", "--yes", timeout=300)
        shutil.rmtree(work.path, ignore_errors=True)
    print(f"| `opsctl token` | {len(times)} | {statistics.median(times):.2f} s | "
          f"{max(times):.2f} s | < 1 s |")


if __name__ == "__main__":
    main()
