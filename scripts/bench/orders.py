#!/usr/bin/env python3
"""Benchmarks of the order flow on the local target, all on this machine's cores:

1. accepted orders per second through POST /orders (token validation, publisher
   confirms), offered open-loop at --rate for --duration seconds;
2. p50/p99 latency at half the accepted rate;
3. end-to-end latency of regular orders: API accepted (created_at) → MongoDB → CDC →
   Kafka (the record's broker timestamp).

Installs the whole platform with its services in a fresh working directory on free
ports, then purges it. Usage: .venv/bin/python scripts/bench/orders.py [--rate 1500] [--duration 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integration.conftest import Workdir, port_override, reachable_dir  # noqa: E402


def simulate(work: Workdir, rate: float, duration: float) -> dict:
    result = work.run("orders", "simulate", "--rate", str(rate), "--duration", str(duration),
                      "--seed", "1", "-o", "json", check_json=True, timeout=duration * 10 + 60)
    return result.json


def end_to_end(work: Workdir, orders: int) -> list[float]:
    """Seconds from created_at to the Kafka record of each of `orders` regular orders."""
    from confluent_kafka import Consumer

    from opsctl.components import keycloak_realm
    from tests.integration.conftest import workdir_context
    import httpx

    ctx = workdir_context(work)
    token = keycloak_realm.client_credentials(
        ctx, "create-orders-client", keycloak_realm.client_secret(ctx, "create-orders-client"))["access_token"]
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{work.port('kafka', 'broker')}",
                         "group.id": f"bench-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    consumer.subscribe(["orders-topic"])  # from the start; records of other orders are skipped
    created = {}
    url = f"http://127.0.0.1:{ctx.spec.services['order-creator'].port}/orders"
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
    parser.add_argument("--rate", type=float, default=1500)
    parser.add_argument("--duration", type=float, default=10)
    args = parser.parse_args()
    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    try:
        install = work.run("install")
        if install.returncode != 0:
            sys.exit(install.stderr)
        # The API alone: the workers would share the same two cores with it.
        work.run("services", "stop", *WORKERS)
        simulate(work, 100, 2)  # warm-up
        peak = simulate(work, args.rate, args.duration)
        accepted_rate = peak["accepted"] / peak["elapsed_s"]
        half = simulate(work, round(accepted_rate / 2), args.duration)
        purge_order_queues(work)
        work.run("services", "start", *WORKERS)
        e2e = end_to_end(work, 200)
    finally:
        work.run("down", "--purge", "--yes", timeout=300)
        shutil.rmtree(work.path, ignore_errors=True)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1000  # noqa: E731
    print(json.dumps({"peak": peak, "half": half}, indent=1), file=sys.stderr)
    print("| what | result |")
    print("|---|---|")
    print(f"| offered {args.rate:g}/s for {args.duration:g} s | {peak['accepted']} accepted "
          f"in {peak['elapsed_s']} s = **{accepted_rate:.0f} orders/s**; rejected {peak['rejected']}, "
          f"errors {peak['errors']} |")
    print(f"| latency at {half['rate_per_s']}/s (half) | p50 {half['latency_ms']['p50']} ms, "
          f"p99 {half['latency_ms']['p99']} ms |")
    if e2e:
        print(f"| end to end API → MongoDB → Kafka ({len(e2e)} regular orders) | "
              f"p50 {q(e2e, 0.5):.0f} ms, p99 {q(e2e, 0.99):.0f} ms, "
              f"mean {statistics.fmean(e2e) * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
