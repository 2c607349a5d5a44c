#!/usr/bin/env python3
"""Benchmarks of the kubernetes target on the control plane its tests use
(tests/integration/controlplane.py: real API server, controllers and scheduler, kwok nodes):

1. the control plane's cold start: its processes started to the API server ready, and to
   its 3 nodes Ready;
2. `opsctl install --target kubernetes` on it (every release waited for; the add-ons whose
   charts cannot be fetched here skipped; the configuration steps done through port-forwards
   to real servers on this machine that play the stores' pods: stand_ins.py), the same again
   with nothing changed, `status`, and `down`;

--runs times each, a fresh cluster each run. The binaries are built into the cache first
if they are not there (not timed).
Usage: .venv/bin/python scripts/bench/kube_target.py [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integration import controlplane  # noqa: E402
from tests.integration.conftest import LIVE_WORKDIRS, Workdir, reachable_dir  # noqa: E402
from tests.integration.kubernetes.stand_ins import standing_in  # noqa: E402


UNFETCHABLE = ["--skip", "consul,prometheus-grafana,airflow"]  # their charts cannot be had here (README)


def timed(work: Workdir, *args: str) -> tuple[float, str]:
    """Seconds `opsctl ARGS` took (it must exit 0 or 3), and what it printed."""
    started = time.monotonic()
    done = work.run(*args, timeout=7200)
    if done.returncode not in (0, 3):
        sys.exit(f"opsctl {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done.stdout


def one_run() -> dict[str, float]:
    cluster = controlplane.ControlPlane(Path(tempfile.mkdtemp(prefix="opsctl-bench-kube-")))
    work = Workdir(reachable_dir("opsctl-bench-kube-work-"), {})
    kube = ["--target", "kubernetes", "--kubeconfig", str(cluster.kubeconfig)]
    try:
        started = time.monotonic()
        cluster.start()
        times = {"API server ready": cluster.api_ready_seconds, "nodes Ready": time.monotonic() - started}
        with standing_in(cluster.api(), work):  # real servers in the pods opsctl configures (not timed)
            times["install"] = timed(work, "install", *kube, *UNFETCHABLE)[0]
            times["install, nothing changed"] = timed(work, "install", *kube, *UNFETCHABLE)[0]
            times["status"] = timed(work, "status", *kube)[0]
            times["down"] = timed(work, "down", *kube)[0]
        return times
    finally:
        cluster.stop()
        LIVE_WORKDIRS.remove(work)
        shutil.rmtree(work.path, ignore_errors=True)
        shutil.rmtree(cluster.path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh clusters (default 3)")
    args = parser.parse_args()
    controlplane.build()
    runs = []
    for _ in range(args.runs):
        runs.append(one_run())
        print("; ".join(f"{k} {v:.2f} s" for k, v in runs[-1].items()), file=sys.stderr, flush=True)
    print("| what | each run, s | median, s |\n|---|---|---|")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"| {key} | {', '.join(f'{v:.2f}' for v in values)} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
