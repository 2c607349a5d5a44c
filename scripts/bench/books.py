"""What the benchmarks share: bringing the whole platform up as a user runs it (every
service and the screening stream on) and balancing its books after a load."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integration.conftest import NAMES, Workdir  # noqa: E402


def everything_on(work: Workdir, rate: float = 20) -> None:
    """Install with the services, train the model on generated orders at `rate` orders/s (the
    rate the benchmark will send: the recent-orders feature learns what usual is from it),
    start the stream."""
    for step in (["install"],
                 ["orders", "generate", "--count", "5000", "--seed", "1", "--rate", f"{rate:g}",
                  "--out", "train.jsonl"],
                 ["jobs", "train-vae", "--from", "train.jsonl"], ["jobs", "stream", "start"]):
        done = work.run(*step, timeout=1800)
        if done.returncode != 0:
            sys.exit(f"{' '.join(step)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")


def books(work: Workdir) -> dict[str, int]:
    import psycopg
    from pymongo import MongoClient

    with psycopg.connect(host="127.0.0.1", port=work.port("postgres", "postgres"), user="postgres",
                         password=work.admin_secret("postgres", "password"), dbname=NAMES.postgres.database) as pg:
        priority = pg.execute("SELECT count(*) FROM priority_orders").fetchone()[0]
    with MongoClient(f"mongodb://127.0.0.1:{work.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                     username="opsctl-admin", password=work.admin_secret("mongodb", "admin_password"),
                     authSource="admin") as mongo:
        db = mongo[NAMES.mongodb.database]
        regular, digital = db[NAMES.mongodb.orders].count_documents({}), db[NAMES.mongodb.digital_orders].count_documents({})
        screened = db[NAMES.mongodb.orders].count_documents({"validation.status": {"$exists": True}})
        held = db[NAMES.mongodb.orders].count_documents({"validation.status": "held"})
        stream_dead = db.screening_dead_letters.count_documents({})
    connection = work.amqp()
    channel = connection.channel()
    depths = {q: channel.queue_declare(q, passive=True).method.message_count
              for q in (NAMES.queues.priority, NAMES.queues.regular, NAMES.queues.digital, NAMES.queues.dead_letter,
                        NAMES.queues.validation)}
    connection.close()
    return {"priority": priority, "regular": regular, "digital": digital, "screened": screened,
            "held": held, "stream_dead_lettered": stream_dead,
            "dead_lettered": depths[NAMES.queues.dead_letter], "validation_queue": depths[NAMES.queues.validation],
            "in_queues": depths[NAMES.queues.priority] + depths[NAMES.queues.regular] + depths[NAMES.queues.digital]}


def caught_up(work: Workdir, accepted: int, timeout: float = 300) -> tuple[float, dict]:
    """Seconds until nothing waits in the order queues, every accepted order is stored (or
    dead-lettered) and every stored regular order screened (or dead-lettered by the stream);
    and the books then."""
    started = time.monotonic()
    while True:
        seen = books(work)
        stored = seen["priority"] + seen["regular"] + seen["digital"]
        if (seen["in_queues"] == 0 and stored + seen["dead_lettered"] >= accepted
                and seen["screened"] + seen["stream_dead_lettered"] >= seen["regular"]) \
                or time.monotonic() - started > timeout:
            return time.monotonic() - started, seen
        time.sleep(0.25)
