#!/usr/bin/env python3
"""Benchmarks of the Consul mesh and the blue/green switch on the local target, with the whole
platform on as users run it (every worker, the screening stream):

1. the cost of the mesh: the order API's peak (wrk, --connections for --duration s) and its
   p50/p99 at half that rate, straight to blue's order API (no edge, no ingress, no sidecar)
   and through the edge (nginx -> blue's ingress gateway -> the API's sidecar -> the API),
   alternating, --runs times each;
2. sustained capacity: open-loop orders through the edge (vegeta, built from its Go module
   into the cache) for 20 s at each of 40, 80, 120, ... orders/s until one is not all
   answered 201 or its p99 passes the switch's own max_p99_ms (platform.yaml); the last rate
   that passed is the capacity (wrk's peak is a burst the platform does not sustain);
3. switches under load: open-loop orders through the edge at half that capacity during each
   of --switches runs of
   `opsctl bluegreen switch` back and forth; failed requests (sent and not answered 201),
   orders lost (accepted and not stored once the workers caught up), each switch's time to
   traffic on the new colour (gate excluded) and with its gate, switches the analysis
   rolled back;
4. failover: GETs of the stock catalogue through the live colour's ingress at 50/s while its
   stock service stops (its sidecar stays up): time to the first request the peer served,
   requests failed meanwhile, the slowest answer; --failovers times.

Installs the platform in a fresh working directory on free ports, then purges it.
Usage: .venv/bin/python scripts/bench/bluegreen.py [--runs 3] [--switches 10] [--failovers 3] [--rate R]
(--rate skips the capacity step)
"""

from __future__ import annotations

import argparse
import json
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
from tests.integration.conftest import Workdir, cache_dir, port_override, reachable_dir, workdir_context  # noqa: E402


SWITCH_WINDOW = 45  # seconds of load around each switch (its gate and watch take about 25)


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


VEGETA = ("vegeta", "github.com/tsenart/vegeta/v12", "12.13.0")  # opsctl/builds/vegeta pins it


def vegeta() -> str:
    """vegeta, built once from its Go module into the cache: an open-loop load generator."""
    from opsctl import artifacts

    build, package, version = VEGETA
    return str(artifacts.go_binary(build, package, Path(cache_dir()) / f"vegeta-{version}"))


def attack(work: Workdir, rate: float, seconds: float) -> subprocess.Popen:
    """vegeta POSTing orders (priority, regular, digital in turn) to the edge at `rate` per
    second for `seconds`, whatever the answers take (open loop: a slow answer does not slow
    the sending), on kept-alive connections; its JSON report on stdout when done."""
    import base64

    url, token = orders.orders_url(work), orders.people_token(work)
    targets = []
    for kind in ("priority", "regular", "digital"):
        body = json.dumps({"customer": {"id": f"bench-{kind}", "name": "Bench"}, "type": kind,
                           "items": [{"product": "Tea", "category": "grocery", "quantity": 1, "price": 10.0}]})
        targets.append(json.dumps({"method": "POST", "url": url, "body": base64.b64encode(body.encode()).decode(),
                                   "header": {"Authorization": [f"Bearer {token}"],
                                              "Content-Type": ["application/json"]}}))
    binary = vegeta()
    sender = subprocess.Popen([binary, "attack", "-format=json", f"-rate={round(rate)}/s", f"-duration={seconds:g}s",
                               "-timeout=30s"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sender.stdin.write("\n".join(targets) + "\n")
    sender.stdin.close()
    report = subprocess.Popen([binary, "report", "-type=json"], stdin=sender.stdout, stdout=subprocess.PIPE, text=True)
    sender.stdout.close()  # the report's now: it ends when the attack does
    return report


CAPACITY_STEP, CAPACITY_SECONDS = 40, 20


def capacity(work: Workdir) -> dict:
    """The highest open-loop rate (a multiple of CAPACITY_STEP) whose orders were all
    answered 201 with a p99 within the switch's max_p99_ms, and what each step measured."""
    limit = workdir_context(work).spec.bluegreen.max_p99_ms
    steps, rate = [], CAPACITY_STEP
    while True:
        result = json.loads(attack(work, rate, CAPACITY_SECONDS).communicate(timeout=CAPACITY_SECONDS + 60)[0])
        ok = (result.get("status_codes") or {}).get("201", 0)
        p99 = result["latencies"]["99th"] / 1e6
        steps.append({"rate": rate, "requests": result["requests"], "failed": result["requests"] - ok,
                      "p50_ms": result["latencies"]["50th"] / 1e6, "p99_ms": p99})
        print(f"capacity: {rate}/s: {steps[-1]['failed']} failed, p50 {steps[-1]['p50_ms']:.0f} ms, "
              f"p99 {p99:.0f} ms", file=sys.stderr, flush=True)
        if steps[-1]["failed"] or p99 > limit:
            return {"rate": rate - CAPACITY_STEP, "max_p99_ms": limit, "steps": steps}
        rate += CAPACITY_STEP
        time.sleep(5)  # the backlog of the step before drains


def switches(work: Workdir, rate: float, count: int) -> dict:
    """Open-loop orders through the edge at `rate` (vegeta) during each of `count` switches
    back and forth: every request not answered 201 is a failed one (a reset connection too);
    every order answered 201 and not stored once the workers caught up is a lost one."""
    before = stored(caught_up(work, 0)[1])
    runs, sent, accepted, answers, errors, rolled_back = [], 0, 0, {}, set(), []
    for _ in range(count):
        report = attack(work, rate, SWITCH_WINDOW)
        time.sleep(3)
        done = work.run("bluegreen", "switch", "--yes", "--analysis-seconds", "5", "-o", "json", check_json=True)
        data = done.json
        if done.returncode != 0 and not data.get("rolled_back"):
            report.kill()
            sys.exit(f"switch failed: {json.dumps(data)}")
        if data.get("rolled_back"):
            rolled_back.append(next(c["detail"] for c in data["checks"] if not c["ok"]))
        result = json.loads(report.communicate(timeout=SWITCH_WINDOW + 60)[0])
        codes = result.get("status_codes") or {}
        sent += result["requests"]
        accepted += codes.get("201", 0)
        for code, n in codes.items():
            answers[code] = answers.get(code, 0) + n
        errors.update(result.get("errors") or [])
        runs.append({"to": data["to"], "edge_s": data["switch_seconds"],
                     "with_gate_s": data["gate_seconds"] + data["switch_seconds"],
                     "requests": result["requests"], "failed": result["requests"] - codes.get("201", 0),
                     "p99_ms": result["latencies"]["99th"] / 1e6})
        back = " (rolled back)" if data.get("rolled_back") else ""
        print(f"-> {data['to']}{back}: edge {data['switch_seconds'] * 1000:.0f} ms, with the gate "
              f"{runs[-1]['with_gate_s']:.1f} s; {result['requests']} requests, {runs[-1]['failed']} failed, "
              f"p99 {runs[-1]['p99_ms']:.0f} ms", file=sys.stderr, flush=True)
    took, seen = caught_up(work, before + accepted + count)  # each gate's smoke order too
    return {"runs": runs, "requests": sent, "failed": sent - accepted, "answers": answers, "errors": sorted(errors),
            "lost": before + accepted + count - stored(seen), "rate": rate, "caught_up_s": took,
            "rolled_back": rolled_back}


def served_by_peer(ctx, colour: str) -> int:
    """Requests the peer's stock-service sidecar took so far (a failover's land there)."""
    from opsctl import httpclient
    from opsctl.components.mesh import peer_of

    peer = next(c for c, dc in ctx.spec.mesh.datacenters.items() if dc == peer_of(ctx, colour))
    admin = ctx.address("mesh", "stock-service/admin", peer).url("/stats?filter=^http.public_listener.downstream_rq_total$")
    return int(httpclient.request("GET", admin, timeout=2)[2].split(":")[1])


def failover(work: Workdir, times: int) -> list[dict]:
    """GETs of the stock catalogue through the live colour's ingress at 50/s while its stock
    service stops (its sidecar stays up): the time from the stop to the first request the
    peer served (its sidecar's counter, polled every 10 ms), the requests that failed, the
    slowest answer meanwhile (retries included)."""
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
        stop_at, failed, slowest, peer_at, stopped = None, 0, 0.0, None, threading.Event()

        def stop() -> None:
            nonlocal stop_at, peer_at
            time.sleep(2)
            before = served_by_peer(ctx, colour)
            stop_at = time.monotonic()
            ctx.runtime.stop(service)
            stopped.set()
            while peer_at is None and time.monotonic() - stop_at < 5:
                if served_by_peer(ctx, colour) > before:
                    peer_at = time.monotonic() - stop_at
                time.sleep(0.01)

        watcher = threading.Thread(target=stop)
        watcher.start()
        with httpx.Client(timeout=5) as client:
            started = time.monotonic()
            sent = 0
            while not stopped.is_set() or time.monotonic() - stop_at < 5:
                at = time.monotonic()
                try:
                    ok = client.get(url, headers=headers).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if stop_at is not None:
                    failed += not ok
                    slowest = max(slowest, time.monotonic() - at)
                sent += 1
                time.sleep(max(0.0, started + sent / 50 - time.monotonic()))
        watcher.join()
        results.append({"failover_s": peer_at, "failed": failed, "slowest_s": slowest})
        print(f"failover: peer serving {peer_at if peer_at is None else round(peer_at, 3)} s after the stop; "
              f"{failed} failed, slowest answer {slowest * 1000:.0f} ms", file=sys.stderr, flush=True)
        back = work.run("services", "start", "stock-service", "--colour", colour)
        if back.returncode != 0:
            sys.exit(back.stderr)
        time.sleep(7)  # the instance is tried again 5 s after it was taken out (mesh.OUTLIER_RUNTIME)
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
                        help="orders/s during the switches (default: half the sustained capacity, measured)")
    args = parser.parse_args()
    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    try:
        everything_on(work)
        cost = mesh_cost(work, args.connections, args.duration, args.runs) if args.runs else {}
        sustained = {} if args.rate else capacity(work)
        rate = args.rate or sustained["rate"] / 2
        if not rate:
            sys.exit(f"the edge does not sustain {CAPACITY_STEP} orders/s: {sustained['steps']}")
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
    if sustained:
        steps = "; ".join(f"{s['rate']}/s: {s['failed']} failed, p99 {s['p99_ms']:,.0f} ms" for s in sustained["steps"])
        print(f"\nsustained capacity through the edge (open loop, {CAPACITY_SECONDS} s a step, p99 within "
              f"{sustained['max_p99_ms']:.0f} ms): {sustained['rate']}/s ({steps})")
    edge = [r["edge_s"] * 1000 for r in switched["runs"]]
    gated = [r["with_gate_s"] for r in switched["runs"]]
    print(f"\n{len(switched['runs'])} switches under {switched['rate']:.0f} orders/s through the edge (open loop): "
          f"{switched['requests']:,} requests, {switched['failed']} failed (answers {switched['answers']}, "
          f"errors {switched['errors']}), {switched['lost']} orders lost "
          f"(caught up {switched['caught_up_s']:.0f} s after); edge moved in median {statistics.median(edge):.0f} ms "
          f"(max {max(edge):.0f}), with the gate median {statistics.median(gated):.1f} s (analysis 5 s); "
          f"rolled back by the analysis: {len(switched['rolled_back'])} {switched['rolled_back']}")
    times = ", ".join("never" if f["failover_s"] is None else f"{f['failover_s']:.2f}" for f in failovers)
    failed = ", ".join(str(f["failed"]) for f in failovers)
    slowest = ", ".join(f"{f['slowest_s'] * 1000:.0f}" for f in failovers)
    print(f"failover of the live colour's stock service, {len(failovers)} times: served by the peer after "
          f"{times} s; failed requests at 50/s: {failed}; slowest answer {slowest} ms")


if __name__ == "__main__":
    main()
