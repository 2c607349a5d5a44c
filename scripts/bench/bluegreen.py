#!/usr/bin/env python3
"""Benchmarks of the Consul mesh and the blue/green switch on the local target, with the whole
platform on as users run it (every worker, the screening stream):

1. the cost of the mesh: the order API's peak (wrk, --connections for --duration s) and its
   p50/p99 at half that rate, straight to blue's order API (no edge, no ingress, no sidecar)
   and through the edge (nginx -> blue's ingress gateway -> the API's sidecar -> the API),
   alternating, --runs times each;
2. switches under load: open-loop orders through the edge (`opsctl orders simulate`) at half
   the edge's median peak while `opsctl bluegreen switch` runs --switches times back and
   forth; failed requests (sent and not answered 201), orders lost (accepted and not stored
   once the workers caught up), each switch's time to traffic on the new colour (the edge's
   reload; gate excluded) and with its gate;
3. failover: GETs of the stock catalogue through the live colour's ingress at 50/s while its
   stock service stops (its sidecar stays up): time to the first answer served by the peer,
   requests failed meanwhile; --failovers times.

Installs the platform in a fresh working directory on free ports, then purges it.
Usage: .venv/bin/python scripts/bench/bluegreen.py [--runs 3] [--switches 10] [--failovers 3] [--rate R]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import orders  # noqa: E402
from books import caught_up, everything_on  # noqa: E402
from tests.integration.conftest import OPSCTL, Workdir, cache_dir, port_override, reachable_dir, workdir_context  # noqa: E402


def stored(seen: dict) -> int:
    return seen["priority"] + seen["regular"] + seen["digital"] + seen["dead_lettered"]


def mesh_cost(work: Workdir, connections: int, duration: float, runs: int) -> dict:
    results: dict[str, list[dict]] = {"direct": [], "edge": []}
    for _ in range(runs):
        for way in results:
            orders.DIRECT = way == "direct"
            peak = orders.wrk(work, connections, duration)
            paced = orders.wrk(work, connections, duration, rate=peak["accepted_per_s"] / 2)
            results[way].append({"peak": peak["accepted_per_s"], "p50": paced["p50_ms"], "p99": paced["p99_ms"]})
            print(f"{way}: peak {peak['accepted_per_s']:.0f}/s; at half: p50 {paced['p50_ms']:.1f} ms, "
                  f"p99 {paced['p99_ms']:.1f} ms", file=sys.stderr, flush=True)
    orders.DIRECT = False
    return results


def switches(work: Workdir, rate: float, count: int) -> dict:
    """Open-loop orders through the edge at `rate` (two `opsctl orders simulate`, each a real
    client: a fresh connection when the edge closes an idle one, one try per order) while the
    switch runs `count` times. (wrk is not used here: it counts the idle connections the
    reloaded edge closes as failed requests, though no request was on them.)"""
    before = stored(caught_up(work, 0)[1])
    budget = count * 25 + 20  # seconds: each switch's gate and watch, and room
    env = {**os.environ, "OPSCTL_CACHE_DIR": cache_dir()}
    loads = [subprocess.Popen([*OPSCTL, "orders", "simulate", "--rate", f"{rate / 2:g}", "--duration", str(budget),
                               "--seed", str(seed), "-o", "json"], cwd=work.path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for seed in (1, 2)]
    time.sleep(5)
    runs = []
    for _ in range(count):
        done = work.run("bluegreen", "switch", "--yes", "--analysis-seconds", "5", "-o", "json", check_json=True)
        data = done.json
        if done.returncode != 0:
            sys.exit(f"switch failed: {json.dumps(data)}")
        runs.append({"to": data["to"], "edge_s": data["switch_seconds"],
                     "with_gate_s": data["gate_seconds"] + data["switch_seconds"]})
        print(f"-> {data['to']}: edge {data['switch_seconds'] * 1000:.0f} ms, with the gate "
              f"{runs[-1]['with_gate_s']:.1f} s", file=sys.stderr, flush=True)
    summaries = [json.loads(load.communicate(timeout=budget + 120)[0]) for load in loads]
    sent = sum(s["sent"] for s in summaries)
    accepted = sum(s["accepted"] for s in summaries)
    failed = sent - accepted
    took, seen = caught_up(work, before + accepted + count)  # each gate's smoke order too
    return {"runs": runs, "requests": sent, "failed": failed, "lost": before + accepted + count - stored(seen),
            "rate": sum(s["rate_per_s"] for s in summaries), "caught_up_s": took,
            "errors": [s.get("errors") for s in summaries], "rejected": [s.get("rejected") for s in summaries]}


def failover(work: Workdir, times: int) -> list[dict]:
    import httpx

    from opsctl.components import live
    from opsctl.components.services import BundledService

    ctx = workdir_context(work)
    colour = live.colour(ctx)
    url = ctx.address("mesh", "ingress/stock-service", colour).url("/stock/all-categories")
    headers = {"Authorization": f"Bearer {orders.people_token(work)}"}
    results = []
    for _ in range(times):
        service = BundledService("stock-service", ctx, colour=colour)
        stop_at, failed, first_ok, stopped = None, 0, None, threading.Event()

        def stop() -> None:
            nonlocal stop_at
            time.sleep(2)
            stop_at = time.monotonic()
            ctx.runtime.stop(service)
            stopped.set()

        threading.Thread(target=stop).start()
        with httpx.Client(timeout=5) as client:
            started = time.monotonic()
            sent = 0
            while not stopped.is_set() or time.monotonic() - stop_at < 5:
                try:
                    ok = client.get(url, headers=headers).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if stop_at is not None:
                    failed += not ok
                    if not ok and first_ok is None:
                        first_ok = -1.0  # failing: the next success is the failover
                    elif ok and first_ok == -1.0:
                        first_ok = time.monotonic() - stop_at
                sent += 1
                time.sleep(max(0.0, started + sent / 50 - time.monotonic()))
        results.append({"failover_s": max(first_ok or 0.0, 0.0), "failed": failed})
        print(f"failover: {failed} failed, served by the peer {results[-1]['failover_s']:.2f} s after the stop",
              file=sys.stderr, flush=True)
        back = work.run("services", "start", "stock-service", "--colour", colour)
        if back.returncode != 0:
            sys.exit(back.stderr)
        time.sleep(3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--duration", type=float, default=15, help="seconds of each wrk run (default 15)")
    parser.add_argument("--runs", type=int, default=3, help="mesh-cost runs each way (default 3)")
    parser.add_argument("--switches", type=int, default=10, help="switches under load (default 10)")
    parser.add_argument("--failovers", type=int, default=3, help="failovers (default 3)")
    parser.add_argument("--rate", type=float, default=0,
                        help="orders/s during the switches (default: half the edge's median peak; --runs 0 needs it)")
    args = parser.parse_args()
    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    try:
        everything_on(work)
        cost = mesh_cost(work, args.connections, args.duration, args.runs) if args.runs else {}
        rate = args.rate or statistics.median(r["peak"] for r in cost["edge"]) / 2
        switched = switches(work, rate, args.switches)
        failovers = failover(work, args.failovers)
    finally:
        work.remove()
    if cost:
        print("| way | peak accepted/s, each run | median | p50 / p99 at half the peak, median |")
        print("|---|---|---|---|")
    for way, runs in cost.items():
        peaks = ", ".join(f"{r['peak']:,.0f}" for r in runs)
        print(f"| {way} | {peaks} | {statistics.median(r['peak'] for r in runs):,.0f} "
              f"| {statistics.median(r['p50'] for r in runs):.1f} / {statistics.median(r['p99'] for r in runs):.1f} ms |")
    edge = [r["edge_s"] * 1000 for r in switched["runs"]]
    gated = [r["with_gate_s"] for r in switched["runs"]]
    print(f"\n{len(switched['runs'])} switches under {switched['rate']:.0f} orders/s through the edge: "
          f"{switched['requests']:,} requests, {switched['failed']} failed, {switched['lost']} orders lost "
          f"(caught up {switched['caught_up_s']:.0f} s after); edge moved in median {statistics.median(edge):.0f} ms "
          f"(max {max(edge):.0f}), with the gate median {statistics.median(gated):.1f} s (analysis 5 s)")
    times = ", ".join(f"{f['failover_s']:.2f}" for f in failovers)
    print(f"failover of the live colour's stock service, {len(failovers)} times: served by the peer after "
          f"{times} s; failed requests at 50/s: "
          f"{', '.join(str(f['failed']) for f in failovers)}")


if __name__ == "__main__":
    main()
