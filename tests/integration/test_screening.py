"""The AI screening end to end on the local target: simulated traffic with anomalies flows
API → MongoDB → Kafka → Spark (the VAE) → orders-validation, and matches offline scoring."""

import json
from pathlib import Path

import pytest

from tests.integration.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def screening(platform):
    assert platform.run("queues", "apply").returncode == 0
    code, steps = platform.steps("--only", "spark,services")
    assert code == 0, steps
    generated = platform.run("orders", "generate", "--count", "3000", "--seed", "2", "--out", "train.jsonl")
    assert generated.returncode == 0, generated.stderr
    trained = platform.run("jobs", "train-vae", "--from", "train.jsonl", "--epochs", "10", "-o", "json",
                           check_json=True)
    assert trained.returncode == 0 and trained.json["stream_restarted"] is False, trained.stderr
    yield platform
    platform.run("jobs", "stream", "stop")
    platform.run("services", "stop")


def mongo(platform):
    from pymongo import MongoClient

    return MongoClient(f"mongodb://127.0.0.1:{platform.port('mongodb', 'mongo')}/?replicaSet=rs0",
                       tz_aware=True)["ecommerce"]


def validation_messages(platform) -> list[dict]:
    """Everything in orders-validation, put back (a queue read by a person later)."""
    connection = platform.amqp()
    channel = connection.channel()
    bodies = []
    while True:
        method, _, body = channel.basic_get("orders-validation", auto_ack=False)
        if method is None:
            break
        bodies.append(json.loads(body))
    connection.close()  # unacknowledged: they go back to the queue
    return bodies


def produce(platform, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": f"127.0.0.1:{platform.port('kafka', 'broker')}"})
    for value in values:
        producer.produce("orders-topic", key=b"bad", value=value)
    assert producer.flush(30) == 0


def test_flagged_orders_are_held_for_validation_as_offline_scoring_flags_them(screening):
    db = mongo(screening)
    sent = screening.run("orders", "simulate", "--rate", "20", "--duration", "8", "--anomaly-rate", "0.15",
                         "--seed", "4", "-o", "json", check_json=True)
    assert sent.returncode == 0, sent.json
    produce(screening, [b"{not json", json.dumps({"order_id": "no-items", "customer": {"id": "c"}}).encode()])
    stored = wait_for(lambda: db.orders.count_documents({}), 60, what="regular orders in MongoDB")

    started = screening.run("jobs", "stream", "start", "-o", "json", check_json=True)
    assert started.returncode == 0 and started.json["state"] == "changed", started.stderr
    wait_for(lambda: db.orders.count_documents({"validation.status": {"$exists": True}})
             >= db.orders.count_documents({}) >= stored, 180, interval=1, what="every order screened")
    held = {d["_id"] for d in db.orders.find({"validation.status": "held"}, {"_id": 1})}
    ours = {d["_id"] for d in db.orders.find({"customer.name": {"$regex": "^Customer "}}, {"_id": 1})}
    assert 0 < len(held & ours) < len(ours) / 2, f"{len(held & ours)} of {len(ours)} flagged: expected a few"
    queued = validation_messages(screening)
    assert sorted(m["order_id"] for m in queued) == sorted(held)  # each once

    dead = wait_for(lambda: list(db.screening_dead_letters.find()) if db.screening_dead_letters.count_documents({}) >= 2
                    else None, 60, what="the two bad records dead-lettered")
    assert sorted(d["reason"].split(":")[0] for d in dead) == ["items is missing or empty", "not JSON"]

    # Offline scoring of the same orders flags the same ones.
    export = Path(screening.path / "stored.jsonl")
    export.write_text("".join(json.dumps({**d, "order_id": d["_id"]}, default=str) + "\n"
                              for d in db.orders.find({}, {"validation": 0})))
    scored = screening.run("jobs", "score", str(export), "--out", str(export) + ".scores", "-o", "json",
                           check_json=True)
    assert scored.returncode == 0, scored.stderr
    offline = {json.loads(line)["order_id"] for line in Path(str(export) + ".scores").read_text().splitlines()
               if json.loads(line)["flagged"]}
    assert offline == held

    status = screening.run("jobs", "stream", "status", "-o", "json", check_json=True)
    assert status.returncode == 0 and status.json["flagged"] == len(held) and status.json["dead_lettered"] == 2


def test_a_restarted_stream_continues_from_its_checkpoint_and_flags_nothing_twice(screening):
    db = mongo(screening)
    before = len(validation_messages(screening))
    screened = db.orders.count_documents({"validation.status": {"$exists": True}})
    assert screening.run("jobs", "stream", "stop").returncode == 0
    more = screening.run("orders", "simulate", "--rate", "10", "--duration", "3", "--seed", "5")
    assert more.returncode == 0
    assert screening.run("jobs", "stream", "start").returncode == 0
    wait_for(lambda: db.orders.count_documents({"validation.status": {"$exists": True}})
             == db.orders.count_documents({}) > screened, 180, interval=1, what="the new orders screened")
    held = db.orders.count_documents({"validation.status": "held"})
    assert len(validation_messages(screening)) == held >= before


def test_stream_start_without_a_model_says_to_train_one(workdir):
    result = workdir.run("jobs", "stream", "start")
    assert result.returncode == 2 and "train one first: opsctl jobs train-vae" in result.stderr
