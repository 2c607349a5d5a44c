#!/usr/bin/env python3
"""Benchmarks of the order flow on the local target, all on this machine's cores:

1. accepted orders per second through POST /orders (token validation, publisher
   confirms, the Redis cache), driven by wrk (scripts/bench/orders.lua) with --connections
   for --duration seconds, without and with an Idempotency-Key on every request;
2. p50/p99 latency at half the accepted rate (wrk paced by the script);
3. end-to-end latency of regular orders: API accepted (created_at) → MongoDB → CDC →
   Kafka (the record's broker timestamp).

Installs the whole platform with its services in a fresh working directory on free
ports, then purges it. Needs wrk (scripts/setup installs it).
Usage: .venv/bin/python scripts/bench/orders.py [--connections 32] [--duration 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integration.conftest import Workdir, port_override, reachable_dir  # noqa: E402


LUA = Path(__file__).with_name("orders.lua")


def people_token(work: Workdir) -> str:
    return work.run("token", "-o", "json", check_json=True).json["access_token"]


def orders_url(work: Workdir) -> str:
    from tests.integration.conftest import workdir_context

    return f"http://127.0.0.1:{workdir_context(work).spec.services['order-creator'].port}/orders"


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
    consumer.subscribe(["orders-topic"])  # from the start; records of other orders are skipped
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
    for queue in ("priority-orders", "regular-orders", "digital-orders"):
        channel.queue_purge(queue)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20)
    args = parser.parse_args()
    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    try:
        install = work.run("install")
        if install.returncode != 0:
            sys.exit(install.stderr)
        # The API alone: the workers would share the same two cores with it.
        work.run("services", "stop", *WORKERS)
        wrk(work, args.connections, 3)  # warm-up
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
        work.run("down", "--purge", "--yes", timeout=300)
        shutil.rmtree(work.path, ignore_errors=True)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000  # noqa: E731
    print(json.dumps({"peak": peak, "idempotency_keys": keyed, "half": half}, indent=1), file=sys.stderr)

    def row(what: str, run: dict) -> str:
        return (f"| {what} | **{run['accepted_per_s']:.0f} accepted/s** ({run['requests']} in "
                f"{run['duration_s']:.1f} s, {run['non_2xx']} not 2xx, {run['socket_errors']} socket "
                f"errors); p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms |")

    print("| what | result |")
    print("|---|---|")
    print(row(f"as fast as it answers, {args.connections} connections", peak))
    print(row("the same, a new Idempotency-Key on every request", keyed))
    print(row(f"paced for half the peak ({round(peak['accepted_per_s'] / 2)}/s)", half))
    if e2e:
        print(f"| end to end API → MongoDB → Kafka ({len(e2e)} regular orders) | "
              f"p50 {q(e2e, 0.5):.0f} ms, p99 {q(e2e, 0.99):.0f} ms, "
              f"mean {statistics.fmean(e2e) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
