#!/usr/bin/env python3
"""How the kubernetes target grows with the services' replicas, on the control plane its tests
use (tests/integration/controlplane.py: real API server, controllers and scheduler) with
--nodes kwok nodes: for each count in --replicas, `kubernetes.replicas` pods in every
Deployment of a bundled service (each HTTP service has two, blue and green), then

1. `opsctl install --target kubernetes` from nothing (every release waited for: all pods
   Ready; the add-ons whose charts cannot be fetched here skipped; the configuration steps
   through port-forwards to real servers that play the stores' pods), and the same again
   with nothing changed;
2. `opsctl status --target kubernetes`;
3. `opsctl bluegreen switch --target kubernetes --yes --analysis-seconds 1` (its gate, the
   move of the Services, a 1 s watch) and the seconds until every Service selected the new
   colour;
4. `opsctl down --target kubernetes --purge --yes` (not timed).

One cluster for the whole run; the binaries are built into the cache first if needed.
Usage: .venv/bin/python scripts/bench/kube_scale.py [--nodes 100] [--replicas 10,100,1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integration import controlplane  # noqa: E402
from tests.integration.conftest import LIVE_WORKDIRS, Workdir, reachable_dir  # noqa: E402
from tests.integration.kubernetes.stand_ins import standing_in  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kube_target import UNFETCHABLE, timed  # noqa: E402


def pods(cluster, namespace: str) -> int:
    from kubernetes import client

    found = client.CoreV1Api(cluster.api()).list_namespaced_pod(namespace, limit=1)
    return len(found.items) + (found.metadata.remaining_item_count or 0)


def one_size(cluster, replicas: int) -> dict:
    work = Workdir(reachable_dir("opsctl-bench-scale-"), {})
    kube = ["--target", "kubernetes", "--kubeconfig", str(cluster.kubeconfig)]
    try:
        work.write_config({"kubernetes": {"replicas": replicas, "timeout_seconds": 3600}})
        row = {"replicas": replicas}
        with standing_in(cluster.api(), work):  # real servers in the pods opsctl configures (not timed)
            row["install"], _ = timed(work, "install", *kube, *UNFETCHABLE)
            row["pods"] = pods(cluster, work.spec.kubernetes.namespace("services"))
            row["install, nothing changed"], _ = timed(work, "install", *kube, *UNFETCHABLE)
            row["status"], _ = timed(work, "status", *kube)
            row["bluegreen switch"], shown = timed(work, "bluegreen", "switch", *kube, "--yes",
                                                   "--analysis-seconds", "1", "-o", "json")
            row["Services moved"] = json.loads(shown)["switch_seconds"]
            work.run("down", *kube, "--purge", "--yes")
        return row
    finally:
        LIVE_WORKDIRS.remove(work)
        shutil.rmtree(work.path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100, help="kwok nodes (default 100)")
    parser.add_argument("--replicas", default="10,100,1000", help="pods per Deployment, in turn")
    args = parser.parse_args()
    controlplane.build()
    cluster = controlplane.ControlPlane(Path(tempfile.mkdtemp(prefix="opsctl-bench-scale-kube-")))
    cluster.nodes = args.nodes
    rows = []
    try:
        cluster.start()
        for replicas in (int(r) for r in args.replicas.split(",")):
            rows.append(one_size(cluster, replicas))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(cluster.path, ignore_errors=True)
    keys = [k for k in rows[0] if k != "replicas"]
    print("| replicas per Deployment | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for row in rows:
        print(f"| {row['replicas']} | " + " | ".join(
            str(row[k]) if k == "pods" else f"{row[k]:.2f} s" for k in keys) + " |")


if __name__ == "__main__":
    main()
