"""Where the streaming job's results go: the flagged orders to RabbitMQ (publisher confirms),
each order's validation status and the dead letters to MongoDB, and the job's metrics (see
order_services.screening.stream for the per-batch rules)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from order_services.screening.stream import Settings

log = logging.getLogger("order_screening")

PUBLISH_PATIENCE = 120.0  # seconds a batch waits for a lost RabbitMQ before it fails
CONFIRM_TIMEOUT = 30.0  # seconds a publish waits for the broker's confirm
IN_LIST = 25  # values per $in query: SecantusDB takes time that grows with the square of its length


def in_chunks(values: list) -> list[list]:
    return [values[i:i + IN_LIST] for i in range(0, len(values), IN_LIST)]


class Sinks:
    """MongoDB and RabbitMQ, as the driver writes a batch's results to them."""

    def __init__(self, settings: Settings, secrets):
        self.settings, self.secrets = settings, secrets
        self._mongo = None
        from prometheus_client import Counter, Histogram

        self.scored = Counter("screening_orders_scored_total", "Orders scored by the VAE")
        self.flagged = Counter("screening_orders_flagged_total", "Orders held for validation")
        self.dead = Counter("screening_records_dead_lettered_total", "Records that could not be scored")
        self.latency = Histogram("screening_kafka_to_flag_seconds", "Kafka record time → flag published",
                                 buckets=(0.5, 1, 2, 3, 5, 10, 20, 60))

    def mongo(self):
        if self._mongo is None:
            from pymongo import MongoClient

            creds = self.secrets.read()
            self._mongo = MongoClient(self.settings.mongodb_url, username=creds["mongodb_username"],
                                      password=creds["mongodb_password"], authSource=self.settings.database,
                                      tz_aware=True, serverSelectionTimeoutMS=10000,
                                      retryWrites=False)  # idempotent writes; see the consumer
        return self._mongo[self.settings.database]

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish a batch's flagged orders, all in flight at once, and wait for every
        confirm: one round trip per batch, not one per order. Each batch opens its own
        connection, so an idle stream holds none for the broker to drop on missed heartbeats.
        A lost broker (a restart) is retried with a backoff for up to PUBLISH_PATIENCE
        seconds, then the batch fails and is replayed from the checkpoint when the job
        restarts. A message published twice that way carries the same message_id (its order_id)."""
        import asyncio

        from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, DeliveryError

        deadline, delay = time.monotonic() + PUBLISH_PATIENCE, 0.5
        while True:
            try:
                asyncio.run(self._publish_confirmed(messages))
                return
            except DeliveryError:
                raise  # unroutable (mandatory) or nacked: the topology is wrong, not the broker away
            except (AMQPError, ChannelInvalidStateError, asyncio.TimeoutError, OSError) as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("RabbitMQ unreachable (%s: %s); publishing %d flagged order(s) again in %.1f s",
                            type(e).__name__, e, len(messages), delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _publish_confirmed(self, messages: list[tuple[str, bytes]]) -> None:
        import asyncio

        import aio_pika

        creds = self.secrets.read()
        connection = await aio_pika.connect(
            host=self.settings.rabbitmq_host, port=self.settings.rabbitmq_port,
            login=creds["rabbitmq_username"], password=creds["rabbitmq_password"], timeout=10,
            client_properties={"connection_name": "order-screening"})
        async with connection:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.get_exchange(self.settings.exchange, ensure=False)
            await asyncio.gather(*(exchange.publish(
                aio_pika.Message(body, content_type="application/json", message_id=order_id,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                self.settings.routing_key, mandatory=True, timeout=CONFIRM_TIMEOUT)
                for order_id, body in messages))

    def recent_orders(self, customers: list[str],
                      since: dt.datetime) -> tuple[dict[str, list[float]], dict[str, bool]]:
        """These customers' orders since `since`: the created_at of each customer's (seconds
        since the epoch, for the recent-order feature), and whether each order is screened
        already (a replayed batch, or the same order twice on the topic). A batch's own
        orders are among them: `since` is before the first of them."""
        from order_services.screening.features import created_at_or_none

        history: dict[str, list[float]] = {}
        screened: dict[str, bool] = {}
        # created_at is the API's ISO 8601 string in UTC, so strings compare as instants; a
        # second of slack covers another spelling of the same instant ("Z" for "+00:00").
        floor = (since - dt.timedelta(seconds=1)).isoformat()
        orders = self.mongo()[self.settings.collection]
        for chunk in in_chunks(customers):
            for doc in orders.find({"customer.id": {"$in": chunk}, "created_at": {"$gte": floor}},
                                   {"customer.id": 1, "created_at": 1, "validation.status": 1}):
                stamp = created_at_or_none(doc)
                if stamp is not None and stamp >= since.timestamp():
                    history.setdefault(doc["customer"]["id"], []).append(stamp)
                screened[doc["_id"]] = bool((doc.get("validation") or {}).get("status"))
        return history, screened

    def write(self, rows: list, batch_id: int, threshold: float, model_version: str, screened: dict[str, bool],
              lap=lambda phase: None) -> None:
        """Publish the flagged orders that are in the store (`screened`: the stored orders found
        so far, and whether each is screened already), then set every order's validation (one
        transaction: a commit per batch, not per order); `lap(phase)` is called as each phase
        ends (the batch's log line says where its time went)."""
        from pymongo import UpdateOne

        db = self.mongo()
        orders = db[self.settings.collection]
        good = [r for r in rows if r.error is None]
        unseen = [r.order_id for r in good if r.order_id not in screened]  # rare: an odd customer id
        for chunk in in_chunks(unseen):
            for d in orders.find({"_id": {"$in": chunk}}, {"validation.status": 1}):
                screened[d["_id"]] = bool((d.get("validation") or {}).get("status"))
        done = {order_id for order_id, yes in screened.items() if yes}
        now = dt.datetime.now(dt.timezone.utc)
        updates, flagged = [], []
        for r in good:
            if r.order_id not in screened:
                continue  # not in the store (gone since): there is no order to hold
            if r.order_id in done:
                continue  # screened already: a replayed batch, or the same order twice on the topic
            done.add(r.order_id)
            status = "held" if r.flagged else "passed"
            if r.flagged:
                flagged.append((r, json.dumps({
                    "order_id": r.order_id, "score": r.score, "threshold": threshold,
                    "model": model_version, "flagged_at": now.isoformat()}).encode()))
            updates.append(UpdateOne({"_id": r.order_id}, {"$set": {"validation": {
                "status": status, "score": r.score, "threshold": threshold, "model": model_version,
                "batch": batch_id, "screened_at": now,
                "kafka_at": dt.datetime.fromtimestamp(r.kafka_ms / 1000, dt.timezone.utc)}}}))
        if flagged:
            self.publish([(r.order_id, body) for r, body in flagged])
            self.flagged.inc(len(flagged))
            for r, _ in flagged:
                self.latency.observe(max(0.0, time.time() - r.kafka_ms / 1000))
        lap("publish")
        if updates:
            with self._mongo.start_session() as session:
                session.with_transaction(lambda s: orders.bulk_write(updates, ordered=False, session=s))
        lap("write")
        self.scored.inc(len(updates))
        dead = [r for r in rows if r.error is not None]
        if dead:
            db[self.settings.dead_letters].bulk_write([UpdateOne(
                {"_id": f"{self.settings.topic}:{r.partition}:{r.offset}"},
                {"$set": {"reason": r.error, "value": r.value, "order_id": r.order_id, "at": now}},
                upsert=True) for r in dead], ordered=False)
            self.dead.inc(len(dead))
