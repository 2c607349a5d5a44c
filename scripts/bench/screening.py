#!/usr/bin/env python3
"""Benchmarks of the AI screening.

1. Detection quality: `opsctl jobs evaluate` on generated, labelled orders (VAE against
   IsolationForest on the same split, ROC-AUC and PR-AUC per anomaly kind).
2. Batch scoring on CPU: orders per second through the VAE alone (a feature matrix) and
   with the features computed from the order documents.
3. (--stream) The streaming job end to end on the local platform: simulated traffic
   through the API at --rate for --duration s; Kafka record → order screened (p50/p99)
   and API → screened, from each order's validation fields.
4. (--catch-up N, with --stream) a stopped job catching up: N orders sent (anomaly rate
   0.3) while it is stopped, then the seconds from `jobs stream start` until every one is
   screened, and the orders per second that makes.

Usage: .venv/bin/python scripts/bench/screening.py [--orders 20000]
       [--stream --rate 50 --duration 30 [--catch-up 10000]]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from books import books  # noqa: E402
from tests.integration.conftest import NAMES, OPSCTL, Workdir, port_override, reachable_dir  # noqa: E402


def quality(orders: int, folder: Path) -> dict:
    subprocess.run([*OPSCTL, "orders", "generate", "--count", str(orders), "--seed", "1", "--out",
                    str(folder / "labelled.jsonl")], check=True, capture_output=True, cwd=folder)
    result = subprocess.run([*OPSCTL, "jobs", "evaluate", str(folder / "labelled.jsonl"), "-o", "json"],
                            check=True, capture_output=True, text=True, cwd=folder)
    return json.loads(result.stdout)


def batch_throughput(folder: Path, count: int = 200_000) -> dict:
    from opsctl import spec
    from opsctl.orders import labelled
    from order_services.screening import features, model

    orders = labelled(spec.load(None).catalogue.products, count, 0.05, seed=3)
    screen = model.train([o for o in orders[:20000] if o["label"] == "normal"], epochs=5)
    started = time.perf_counter()
    x, _ = features.matrix(orders, screen.schema)
    featurised = time.perf_counter() - started
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        screen.scores(x)
        runs.append(time.perf_counter() - started)
    best = min(runs)
    return {"orders": count, "model_only_per_s": count / best,
            "with_features_per_s": count / (best + featurised)}


def unscreened(db) -> int:
    return db[NAMES.mongodb.orders].count_documents({"validation": {"$exists": False}})


def catch_up(work: Workdir, db, count: int) -> dict:
    """Stop the job, send `count` orders as fast as the API takes them, start the job, and
    time how long it takes to screen them all."""
    work.run("jobs", "stream", "stop")
    rate = 200  # about what `orders simulate` sustains on two busy cores
    work.run("orders", "simulate", "--rate", str(rate), "--duration", str(count / rate), "--anomaly-rate", "0.3",
             timeout=1800)
    while books(work)["in_queues"]:
        time.sleep(0.5)  # the consumers store them
    waiting, held = unscreened(db), db[NAMES.mongodb.orders].count_documents({"validation.status": "held"})
    started = time.monotonic()
    assert work.run("jobs", "stream", "start").returncode == 0
    while unscreened(db) and time.monotonic() - started < 1800:
        time.sleep(0.5)
    took = time.monotonic() - started
    return {"orders": waiting, "seconds": took, "per_s": waiting / took,
            "flagged": db[NAMES.mongodb.orders].count_documents({"validation.status": "held"}) - held, "left": unscreened(db)}


def stream(rate: float, duration: float, backlog: int) -> dict:
    from pymongo import MongoClient

    from order_services.screening import features

    work = Workdir(reachable_dir("opsctl-bench-"), port_override())
    try:
        for args in (["install"], ["orders", "generate", "--count", "5000", "--rate", str(rate), "--out", "train.jsonl"],
                     ["jobs", "train-vae", "--from", "train.jsonl", "--epochs", "10"], ["jobs", "stream", "start"]):
            result = work.run(*args)
            if result.returncode != 0:
                sys.exit(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        sent = work.run("orders", "simulate", "--rate", str(rate), "--duration", str(duration),
                        "--anomaly-rate", "0.05", "-o", "json", check_json=True).json
        db = MongoClient(f"mongodb://127.0.0.1:{work.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                         username="opsctl-admin", password=work.admin_secret("mongodb", "admin_password"),
                         authSource="admin", tz_aware=True)[NAMES.mongodb.database]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and unscreened(db):
            time.sleep(1)
        kafka, api = [], []
        for doc in db[NAMES.mongodb.orders].find({"validation": {"$exists": True}}):
            v = doc["validation"]
            kafka.append((v["screened_at"] - v["kafka_at"]).total_seconds())
            api.append(v["screened_at"].timestamp() - features.created_at(doc))
        status = work.run("jobs", "stream", "status", "-o", "json", check_json=True).json
        caught = catch_up(work, db, backlog) if backlog else None
    finally:
        work.run("down", "--purge", "--yes", timeout=300)
        shutil.rmtree(work.path, ignore_errors=True)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] if xs else None  # noqa: E731
    return {"sent": sent["accepted"], "screened": len(kafka), "flagged": status.get("flagged"),
            "kafka_to_screened_s": {"p50": q(kafka, 0.5), "p99": q(kafka, 0.99)},
            "api_to_screened_s": {"p50": q(api, 0.5), "p99": q(api, 0.99)}, "catch_up": caught}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=20000)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--catch-up", type=int, default=0, metavar="N")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="opsctl-bench-screening-"))
    try:
        evaluation = quality(args.orders, folder)
        batch = batch_throughput(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"evaluation": evaluation, "batch": batch}, indent=1), file=sys.stderr)
    print(f"trained on {evaluation['trained_on']} normal orders, tested on {evaluation['tested_on']}\n")
    print("| anomaly kind | anomalies | VAE ROC-AUC | VAE PR-AUC | IsolationForest ROC-AUC | IsolationForest PR-AUC |")
    print("|---|---|---|---|---|---|")
    for e in evaluation["table"]:
        print(f"| {e['kind']} | {e['anomalies']} | {e['vae']['roc_auc']} | {e['vae']['pr_auc']} | "
              f"{e['isolation_forest']['roc_auc']} | {e['isolation_forest']['pr_auc']} |")
    at = evaluation["vae_at_threshold"]
    print(f"\nVAE at its threshold: false-positive rate {at['false_positive_rate']}, recall {at['recall']}\n")
    print(f"batch scoring of {batch['orders']} orders: VAE alone **{batch['model_only_per_s']:,.0f} orders/s**, "
          f"with features from the documents {batch['with_features_per_s']:,.0f} orders/s")
    if args.stream:
        result = stream(args.rate, args.duration, args.catch_up)
        print(json.dumps(result, indent=1), file=sys.stderr)
        k, a = result["kafka_to_screened_s"], result["api_to_screened_s"]
        print(f"\nstreaming at {args.rate:g}/s for {args.duration:g} s: {result['screened']} of {result['sent']} "
              f"orders screened ({result['flagged']} flagged); Kafka → screened p50 {k['p50']:.2f} s, "
              f"p99 {k['p99']:.2f} s; API → screened p50 {a['p50']:.2f} s, p99 {a['p99']:.2f} s")
        if result["catch_up"]:
            c = result["catch_up"]
            print(f"\ncatching up on {c['orders']:,} orders sent while the job was stopped ({c['flagged']:,} "
                  f"flagged): **{c['seconds']:.1f} s, {c['per_s']:,.0f} orders/s**; {c['left']} left unscreened")


if __name__ == "__main__":
    main()
