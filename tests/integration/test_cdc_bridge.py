"""The CDC bridge on the real local platform: MongoDB's change stream into Kafka, at least
once, resuming from its token (workers and stores as in test_order_workers)."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import NAMES, service_env
from tests.integration.helpers import stored, wait_for
from tests.integration.test_order_workers import (Paced, mongo, order, publish, rabbit, topic,  # noqa: F401 (fixtures)
                                                  topology, workers)

pytestmark = pytest.mark.integration


# --- the CDC bridge ---------------------------------------------------------------------
def state_file(platform) -> Path:
    return Path(service_env(platform, "cdc-bridge")["STATE_DIR"]) / "resume-token.json"


def test_regular_orders_reach_kafka_keyed_by_order_id(topology, workers, rabbit, mongo, topic):
    workers("regular-consumer"), workers("digital-consumer")
    bridge = workers("cdc-bridge")
    orders = [order("regular") for _ in range(30)]
    digital = order("digital")
    for document in orders + [digital]:
        publish(rabbit, document)
    ids = [o["order_id"] for o in orders]
    wait_for(lambda: stored(mongo[NAMES.mongodb.digital_orders], [digital["order_id"]]), what="digital stored")
    keys = topic.wait_for_keys(ids)
    assert digital["order_id"] not in keys  # only ecommerce.orders is streamed
    values = {key: value for key, value in topic.records if key in ids}
    for document in orders:
        value = dict(values[document["order_id"]])
        assert value.pop("_id") == document["order_id"]
        received = dt.datetime.fromisoformat(value.pop("received_at"))
        assert received.tzinfo is not None
        assert value == document
    assert bridge.metric("records_published_total") >= 30
    assert bridge.metric("cdc_lag_seconds") >= 0
    saved = json.loads(state_file(topology).read_text())
    assert saved["token"]["_data"] and saved["document_id"]
    assert bridge.stop() == 0


def test_cdc_bridge_killed_mid_burst_loses_nothing_and_resumes_from_its_token(
        topology, workers, rabbit, mongo, topic):
    workers("regular-consumer")
    bridge = workers("cdc-bridge")
    base = bridge.metric("records_published_total")
    orders = [order("regular") for _ in range(300)]
    ids = [o["order_id"] for o in orders]
    burst = Paced(topology, orders, rate=150)
    burst.start()
    wait_for(lambda: bridge.metric("records_published_total") >= base + 40,
             what="40 records published")
    bridge.kill()  # kill -9 in the middle of the burst
    topic.read(1)
    at_kill = len(set(ids) & set(topic.keys()))
    assert at_kill < 300
    bridge.start()
    burst.join(30)
    assert burst.error is None and burst.published == 300
    wait_for(lambda: len(stored(mongo[NAMES.mongodb.orders], ids)) == 300, timeout=90, what="300 stored")
    keys = topic.wait_for_keys(ids)
    assert all(keys[i] >= 1 for i in ids)
    print(f"\ncdc-bridge: {at_kill} of 300 on the topic at kill -9; "
          f"{sum(keys[i] for i in ids) - 300} duplicate(s) after the restart")

    # A restart with nothing new publishes nothing new: it resumes after its token.
    assert bridge.stop() == 0
    end = topic.end_offset()
    bridge.start()
    time.sleep(3)
    assert bridge.metric("records_published_total") == 0
    assert bridge.metric("cdc_rescans_total") == 0
    assert topic.end_offset() == end
    assert "resuming the change stream after the saved token" in bridge.log()
    # … and then follows the stream.
    new = order("regular")
    publish(rabbit, new)
    topic.wait_for_keys([new["order_id"]])
    assert bridge.stop() == 0


@pytest.mark.parametrize("tamper,warning", [
    ("token past the history", "in the server's history"),
    ("document gone", "no longer in the collection"),
    ("cluster time ahead", "is ahead of the server's")])
def test_cdc_bridge_rescans_when_its_token_does_not_match_the_store(
        topology, workers, rabbit, mongo, topic, tamper, warning):
    """SecantusDB answers a resume token past its history with silence, not an error: the
    bridge must notice and re-scan (duplicates allowed, losses not)."""
    import bson

    workers("regular-consumer")
    bridge = workers("cdc-bridge")
    first = order("regular")
    publish(rabbit, first)
    topic.wait_for_keys([first["order_id"]])
    assert bridge.stop() == 0
    path = state_file(topology)
    state = json.loads(path.read_text())
    assert state["kind"] == "event"
    if tamper == "token past the history":  # as if the store had been wiped and refilled
        inner = bson.decode(bytes.fromhex(state["token"]["_data"]))
        inner["s"] += 1_000_000
        state["token"]["_data"] = bson.encode(inner).hex()
    elif tamper == "document gone":
        state["document_id"] = f"gone-{uuid.uuid4()}"
    else:
        state["cluster_time"] = {"t": state["cluster_time"]["t"] + 1_000_000, "i": 1}
    path.write_text(json.dumps(state))
    total = mongo[NAMES.mongodb.orders].count_documents({})

    bridge.start()
    assert bridge.metric("cdc_rescans_total") == 1
    assert bridge.metric("records_published_total") >= total
    assert warning in bridge.log() and "re-scanning" in bridge.log(), bridge.log()
    later = order("regular")
    publish(rabbit, later)
    topic.wait_for_keys([first["order_id"], later["order_id"]])
    assert bridge.stop() == 0


@pytest.mark.parametrize("server", ["kafka", "mongodb"])
def test_cdc_bridge_carries_on_after_a_server_restart(topology, workers, rabbit, mongo, topic,
                                                      server):
    """Kafka down: the records wait, unacknowledged, and their token is not saved; MongoDB
    down: the bridge reconnects and resumes after its token. Nothing is lost either way."""
    from opsctl.components import build
    from tests.integration.conftest import workdir_context

    consumer = workers("regular-consumer")
    bridge = workers("cdc-bridge")
    before = order("regular")
    publish(rabbit, before)
    topic.wait_for_keys([before["order_id"]])

    assert build(server, workdir_context(topology)).stop()
    during = [order("regular") for _ in range(20)]
    if server == "kafka":  # the consumer stores them; the bridge cannot deliver them yet
        for document in during:
            publish(rabbit, document)
        wait_for(lambda: len(stored(mongo[NAMES.mongodb.orders], [o["order_id"] for o in during])) == 20,
                 what="20 orders stored while Kafka is down")
        time.sleep(3)
    else:
        time.sleep(3)
    code, steps = topology.steps("--only", server)
    assert code == 0, steps
    if server == "mongodb":
        for document in during:
            publish(rabbit, document)
    topic.wait_for_keys([o["order_id"] for o in during], timeout=120)
    assert bridge.process.poll() is None and consumer.process.poll() is None
    assert bridge.metric("cdc_rescans_total") == 0 or server == "kafka"
    assert bridge.stop() == 0


def test_cdc_bridge_throughput(workers, mongo, topic):
    """2000 inserts straight into ecommerce.orders, streamed to Kafka (printed with -s)."""
    bridge = workers("cdc-bridge")
    base = bridge.metric("records_published_total")
    orders = [order("regular") for _ in range(2000)]
    started = time.monotonic()
    mongo[NAMES.mongodb.orders].insert_many([{"_id": o["order_id"], **o,
                                  "received_at": dt.datetime.now(dt.timezone.utc)}
                                 for o in orders])
    wait_for(lambda: bridge.metric("records_published_total") >= base + 2000, timeout=120,
             interval=0.01, what="2000 records published")
    took = time.monotonic() - started
    keys = topic.wait_for_keys([o["order_id"] for o in orders])
    assert all(keys[o["order_id"]] == 1 for o in orders)
    print(f"\ncdc-bridge: 2000 inserts on the topic in {took:.2f}s = {2000 / took:.0f} records/s")
    assert bridge.stop() == 0
