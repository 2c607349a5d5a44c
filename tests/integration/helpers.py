"""Helpers shared by the order-flow tests: waiting, reading the stores and the topic."""

from __future__ import annotations

import json
import logging
import time
import uuid


def process_of(server):
    """The local process of a server or service (pid, log file): the local target's, which
    the components themselves know nothing of."""
    return server.ctx.runtime.process(server)


def wait_for(predicate, timeout: float = 60, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stored(collection, ids: list[str]) -> dict[str, list]:
    found: dict[str, list] = {}
    for document in collection.find({"_id": {"$in": ids}}):
        found.setdefault(document["_id"], []).append(document)
    return found


QUIET = logging.getLogger("tests.kafka")
QUIET.setLevel(logging.CRITICAL)  # librdkafka's reconnect attempts while Kafka is restarted


class TopicReader:
    """Reads the orders topic from the beginning; keeps every record seen."""

    def __init__(self, platform, topic: str | None = None):
        from confluent_kafka import Consumer, TopicPartition

        topic = topic or platform.names.topics.orders
        self.consumer = Consumer({
            "bootstrap.servers": f"127.0.0.1:{platform.port('kafka', 'broker')}",
            "group.id": f"test-{uuid.uuid4()}", "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "logger": QUIET})
        self.consumer.assign([TopicPartition(topic, 0, 0)])
        self.topic = topic
        self.records: list[tuple[str, dict]] = []

    def read(self, seconds: float = 0.5) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for message in self.consumer.consume(500, timeout=0.2):
                if message.error():
                    continue
                self.records.append((message.key().decode(), json.loads(message.value())))

    def keys(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key, _ in self.records:
            counts[key] = counts.get(key, 0) + 1
        return counts

    def wait_for_keys(self, ids: list[str], timeout: float = 90) -> dict[str, int]:
        def all_there():
            self.read()
            return set(ids) <= set(self.keys())
        wait_for(all_there, timeout, interval=0, what=f"{len(ids)} records in {self.topic}")
        return self.keys()

    def end_offset(self) -> int:
        from confluent_kafka import TopicPartition

        return self.consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=10)[1]

    def close(self) -> None:
        self.consumer.close()
