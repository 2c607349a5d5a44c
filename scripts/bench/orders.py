#!/usr/bin/env python3
"""Benchmarks of the order flow on the local target, all on this machine's cores:

1. accepted orders per second through POST /orders at the edge, first with the whole
   platform on as users run it (every worker, the CDC bridge, the screening stream; and how
   long they take to catch up after the load), then with the workers and the stream stopped (nginx in front of the API:
   token validation, publisher confirms, the Redis cache), driven by wrk
   (scripts/bench/orders.lua) with --connections for --duration seconds, without and with an
   Idempotency-Key on every request;
2. p50/p99 latency at half the accepted rate (wrk paced by the script);
3. end-to-end latency of regular orders: API accepted (created_at) → MongoDB → CDC →
   Kafka (the record's broker timestamp).

Installs the whole platform with its services in a fresh working directory on free
ports, then purges it. Needs wrk (scripts/setup installs it). Clients use the edge, so the
numbers include it; --direct posts to the API's own port instead, to see what the edge costs.
--api-alone N instead installs without training or starting the stream, stops the workers
and measures only the API, N times direct and N times through the edge (the spread between
runs on a busy 2-core machine is wider than one run suggests).
Usage: .venv/bin/python scripts/bench/orders.py [--connections 32] [--duration 20] [--direct]
       .venv/bin/python scripts/bench/orders.py --api-alone 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from books import caught_up, everything_on  # noqa: E402
from tests.integration.conftest import NAMES, Workdir, port_override, reachable_dir  # noqa: E402


LUA = Path(__file__).with_name("orders.lua")


def people_token(work: Workdir) -> str:
    return work.run("token", "-o", "json", check_json=True).json["access_token"]


DIRECT = False  # --direct: bypass the edge


def orders_url(work: Workdir) -> str:
    """POST /orders as clients reach it: at the edge (with --direct, the API's own port)."""
    from opsctl.components.nginx import edge_url
    from tests.integration.conftest import workdir_context

    ctx = workdir_context(work)
    if DIRECT:
        return f"http://{ctx.host}:{ctx.spec.services['order-creator'].port}/orders"
    return f"{edge_url(ctx)}/orders"


def wrk(work: Workdir, connections: int, duration: float, rate: float = 0, idempotency: bool = False) -> dict:
    """One wrk run against POST /orders; the script's JSON summary."""
    env = {**os.environ, "TOKEN": people_token(work), "DELAY_MS": str(connections / rate * 1000 if rate else 0),
           "IDEMPOTENCY": "1" if idempotency else "0"}
    result = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
                             "-s", str(LUA), orders_url(work)], env=env, capture_output=True, text=True,
                            timeout=duration + 60)
    if result.returncode != 0:
        sys.exit(f"wrk failed: {result.stdout}{result.stderr}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    summary["accepted_per_s"] = (summary["requests"] - summary["non_2xx"]) / summary["duration_s"]
    return summary


def end_to_end(work: Workdir, orders: int) -> list[float]:
    """Seconds from created_at to the Kafka record of each of `orders` regular orders."""
    import httpx
    from confluent_kafka import Consumer

    token = people_token(work)
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{work.port('kafka', 'broker')}",
                         "group.id": f"bench-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    consumer.subscribe([NAMES.topics.orders])  # from the start; records of other orders are skipped
    created = {}
    url = orders_url(work)
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
        for i in range(orders):
            body = {"customer": {"id": f"c-{i}", "name": "Bench"}, "type": "regular",
                    "items": [{"product": "Tea", "category": "grocery", "quantity": 1, "price": 10.0}]}
            order = client.post(url, json=body).json()
            created[order["order_id"]] = datetime.datetime.fromisoformat(order["created_at"]).timestamp()
            time.sleep(0.02)
    latencies, deadline = [], time.monotonic() + 60
    while created and time.monotonic() < deadline:
        message = consumer.poll(1)
        if message is None or message.error():
            continue
        key = message.key().decode()
        if key in created:
            latencies.append(message.timestamp()[1] / 1000 - created.pop(key))
    consumer.close()
    return latencies


WORKERS = ("premium-consumer", "regular-consumer", "digital-consumer", "cdc-bridge")


def purge_order_queues(work: Workdir) -> None:
    connection = work.amqp()
    channel = connection.channel()
    for queue in (NAMES.queues.priority, NAMES.queues.regular, NAMES.queues.digital):
        channel.queue_purge(queue)
    connection.close()


def main() -> None:
    global DIRECT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--duration", type=float, default=20, help="seconds of each wrk run (default 20)")
    parser.add_argument("--direct", action="store_true",
                        help="post to the order API's own port, bypassing the edge (nginx)")
    parser.add_argument("--api-alone", type=int, default=0, metavar="N",
                        help="only the API (workers stopped, no stream), N runs direct and N through the edge")
    args = parser.parse_args()
    DIRECT = args.direct
    if args.api_alone:
        return api_alone(args.connections, args.duration, args.api_alone)
    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    try:
        everything_on(work)
        print(f"POST {orders_url(work)} ({'direct, no edge' if DIRECT else 'through the edge'})",
              file=sys.stderr)
        # As users run it: every worker, the CDC bridge and the screening stream on.
        wrk(work, args.connections, 3)  # warm-up
        caught_up(work, 0)
        on_peak = wrk(work, args.connections, args.duration)
        on_peak["caught_up_s"], _ = caught_up(work, 0)
        on_half = wrk(work, args.connections, args.duration, rate=round(on_peak["accepted_per_s"] / 2))
        on_half["caught_up_s"], books_then = caught_up(work, 0)
        # The API alone: the workers and the stream would share the same two cores with it.
        work.run("jobs", "stream", "stop")
        work.run("services", "stop", *WORKERS)
        purge_order_queues(work)
        peak = wrk(work, args.connections, args.duration)
        purge_order_queues(work)
        keyed = wrk(work, args.connections, args.duration, idempotency=True)
        purge_order_queues(work)
        half = wrk(work, args.connections, args.duration, rate=round(peak["accepted_per_s"] / 2))
        purge_order_queues(work)
        work.run("services", "start", *WORKERS)
        e2e = end_to_end(work, 200)
    finally:
        work.remove()
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000  # noqa: E731
    print(json.dumps({"everything_on": {"peak": on_peak, "half": on_half, "books": books_then},
                      "api_alone": {"peak": peak, "idempotency_keys": keyed, "half": half}}, indent=1),
          file=sys.stderr)

    def row(what: str, run: dict) -> str:
        lag = (f"; consumers and stream caught up {run['caught_up_s']:.1f} s after the load"
               if "caught_up_s" in run else "")
        return (f"| {what} | **{run['accepted_per_s']:.0f} accepted/s** ({run['requests']} in "
                f"{run['duration_s']:.1f} s, {run['non_2xx']} not 2xx, {run['socket_errors']} socket "
                f"errors); p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms{lag} |")

    print("| what | result |")
    print("|---|---|")
    via = "direct to the API" if DIRECT else "through the edge"
    print(row(f"everything on, as fast as it answers, {args.connections} connections, {via}", on_peak))
    print(row(f"everything on, paced for half that ({round(on_peak['accepted_per_s'] / 2)}/s)", on_half))
    print(row(f"workers and stream stopped, as fast as it answers, {args.connections} connections, {via}", peak))
    print(row("the same, a new Idempotency-Key on every request", keyed))
    print(row(f"paced for half the peak ({round(peak['accepted_per_s'] / 2)}/s)", half))
    if e2e:
        print(f"| end to end API → MongoDB → Kafka ({len(e2e)} regular orders) | "
              f"p50 {q(e2e, 0.5):.0f} ms, p99 {q(e2e, 0.99):.0f} ms, "
              f"mean {statistics.fmean(e2e) * 1000:.0f} ms |")


def api_alone(connections: int, duration: float, runs: int) -> None:
    """The API's peak with the workers stopped, `runs` times each way, alternating."""
    global DIRECT
    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    rates: dict[str, list[float]] = {"direct": [], "edge": []}
    try:
        install = work.run("install", timeout=1800)
        if install.returncode != 0:
            sys.exit(install.stderr)
        work.run("services", "stop", *WORKERS)
        wrk(work, connections, 3)  # warm-up
        for _ in range(runs):
            for way in rates:
                DIRECT = way == "direct"
                purge_order_queues(work)
                run = wrk(work, connections, duration)
                rates[way].append(run["accepted_per_s"])
                print(f"{way}: {run['accepted_per_s']:.0f} accepted/s, p50 {run['p50_ms']:.1f} ms, "
                      f"p99 {run['p99_ms']:.1f} ms", file=sys.stderr, flush=True)
    finally:
        work.remove()
    print("| way | accepted/s, each run | median |")
    print("|---|---|---|")
    for way, values in rates.items():
        print(f"| {way} | {', '.join(f'{v:,.0f}' for v in values)} | {statistics.median(values):,.0f} |")


if __name__ == "__main__":
    main()
