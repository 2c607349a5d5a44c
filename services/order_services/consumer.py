"""The order consumers: one RabbitMQ queue into one store, acknowledged only once durable.

    STORE=postgres  QUEUE=priority-orders                            → PostgreSQL orders.priority_orders
    STORE=mongodb   QUEUE=regular-orders  MONGODB_COLLECTION=orders         → MongoDB ecommerce.orders
    STORE=mongodb   QUEUE=digital-orders  MONGODB_COLLECTION=digital_orders → MongoDB ecommerce.digital_orders

(opsctl sets them from each consumer's entry in platform.yaml `services:`.)

Run as `python -m order_services.consumer`; settings come from the environment listed in
docs/ORDER_FLOW.md, credentials from Vault (order_services.secrets).

Delivery rules:
- A message is acknowledged only after its write is durable: the PostgreSQL transaction
  committed, or the MongoDB write acknowledged with {w: majority, j: true}. Writes are
  idempotent by order_id (INSERT … ON CONFLICT DO NOTHING; upsert with $setOnInsert), so a
  redelivered message is stored once.
- A message that can never succeed is dead-lettered at once, without any wait: not JSON, not
  an object, no order_id; or data the store refuses (PostgreSQL refusing a \u0000 in jsonb,
  MongoDB an invalid document). The consumer publishes it itself to DEAD_LETTER_EXCHANGE
  (orders-dlx → orders-dead-letter) with publisher confirms, the original properties and
  headers x-dead-letter-reason, x-dead-letter-queue (where it came from),
  x-dead-letter-routing-key (its type), x-dead-lettered-at (ISO time) and
  x-dead-lettered-by (this service), and only then acknowledges the original. Without
  DEAD_LETTER_EXCHANGE (or if that publish fails) it rejects the message without requeue and
  RabbitMQ dead-letters it (header x-death, no reason). The order's Redis entry
  order:<order_id> then says "status": "dead-lettered" with "dead_letter_reason"; Redis
  being down does not hold dead-lettering up (logged, and Redis is left alone for a while).
- A store refusal that is not about the data (a missing permission, a failing trigger)
  is retried: a copy (header x-attempts + 1) is published to the same queue
  with publisher confirms and only then is the original acknowledged; the try number
  DELIVERY_ATTEMPTS is dead-lettered instead. Retries wait with an exponential backoff.
- A store that cannot be reached costs no attempts: the messages in hand stay unacknowledged
  while the consumer backs off (up to a few seconds) and reconnects, then writes them.
- RabbitMQ going away (a restart) means reconnect with backoff; unacknowledged messages are
  redelivered by the broker and stored once thanks to the idempotent writes.
- SIGTERM/SIGINT: the batch in hand is finished (written and acknowledged), the consumer is
  cancelled, prefetched messages go back to the queue, connections are closed, exit 0.

Metrics (prometheus_client, http://METRICS_HOST:METRICS_PORT/metrics, served once consuming):
messages_processed_total{result=stored|duplicate|retried|dead_lettered},
message_processing_seconds (histogram, per message, delivery batch taken → settled).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from order_services.consumer_stores import (MongoStore, OrderStatus, PostgresStore, StoreRefused,
                                            StoreUnavailable, one_line)
from order_services.settings import ConfigError, Env
from order_services.worker import Backoff, Stopping, Unavailable, run_worker, serve_metrics

log = logging.getLogger("order_services.consumer")

STORES = ("postgres", "mongodb")
PREFETCH = 100       # messages RabbitMQ may have in flight to this consumer
BATCH = 50           # messages written (and committed) together
HEARTBEAT = 30       # seconds
RETRY_BACKOFF = (0.25, 5.0)       # failed messages: first wait, cap (seconds)
UNAVAILABLE_BACKOFF = (0.5, 5.0)  # unreachable store: first wait, cap
RECONNECT_BACKOFF = (0.5, 10.0)   # RabbitMQ or start-up failures: first wait, cap


class Poison(Exception):
    """The message can never be stored (not JSON, no order_id): dead-letter it at once."""


# --- settings ---------------------------------------------------------------------------
@dataclass
class Settings:
    service: str
    store: str
    queue: str
    rabbitmq_host: str
    rabbitmq_port: int
    attempts: int
    metrics_port: int
    dead_letter_exchange: str = ""  # "": reject, and let the queue's own dead-lettering act
    redis: dict = field(default_factory=dict)      # host, port
    postgres: dict = field(default_factory=dict)   # host, port, dbname
    mongodb: dict = field(default_factory=dict)    # url, db, collection

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        settings = Env(env)
        service = settings.text("SERVICE_NAME", "order-consumer")
        store = settings.require("STORE")["STORE"]
        if store not in STORES:
            raise ConfigError(f"STORE must be one of {', '.join(STORES)}, not {store!r}")
        wanted = ["QUEUE", "RABBITMQ_HOST", "RABBITMQ_PORT", "DELIVERY_ATTEMPTS", "METRICS_PORT"]
        wanted += (["POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB"] if store == "postgres"
                   else ["MONGODB_URL", "MONGODB_DB", "MONGODB_COLLECTION"])
        settings.require(*wanted)
        return cls(
            service=service, store=store, queue=env["QUEUE"],
            rabbitmq_host=env["RABBITMQ_HOST"], rabbitmq_port=settings.port("RABBITMQ_PORT"),
            attempts=settings.number("DELIVERY_ATTEMPTS"), metrics_port=settings.port("METRICS_PORT"),
            dead_letter_exchange=env.get("DEAD_LETTER_EXCHANGE", ""),
            redis={"host": env.get("REDIS_HOST"), "port": env.get("REDIS_PORT")},
            postgres={"host": env.get("POSTGRES_HOST"), "port": env.get("POSTGRES_PORT"),
                      "dbname": env.get("POSTGRES_DB")},
            mongodb={"url": env.get("MONGODB_URL"), "db": env.get("MONGODB_DB"),
                     "collection": env.get("MONGODB_COLLECTION")},
        )


class Credentials:
    """This service's credentials from Vault, read again when a server refuses them."""

    def __init__(self):
        from order_services.secrets import VaultSecrets

        self.vault = VaultSecrets.from_env()
        self._cached: dict | None = None

    def get(self, kind: str, refresh: bool = False) -> tuple[str, str]:
        if refresh or self._cached is None:
            try:
                self._cached = self.vault.read()
            except Exception as e:  # Keycloak or Vault down, or refusing: try again later
                raise Unavailable(f"cannot read this service's secrets from Vault: "
                                  f"{type(e).__name__}: {e}") from e
        try:
            return self._cached[f"{kind}_username"], self._cached[f"{kind}_password"]
        except KeyError:
            raise ConfigError(f"Vault holds no {kind} credentials for this service "
                              f"({kind}_username/{kind}_password): run opsctl vault apply") from None


# --- the message ------------------------------------------------------------------------
def parse(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except ValueError as e:
        raise Poison(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise Poison(f"not a JSON object but {type(document).__name__}")
    order_id = document.get("order_id")
    if not isinstance(order_id, str) or not order_id.strip():
        raise Poison("no order_id (a non-empty string)")
    return document


@dataclass
class Delivery:
    tag: int
    properties: Any
    body: bytes
    redelivered: bool
    document: dict | None = None
    exchange: str = ""
    routing_key: str = ""

    @property
    def tries_before(self) -> int:
        """How many tries came before this one (header x-attempts)."""
        try:
            return max(0, int((self.properties.headers or {}).get("x-attempts", 0)))
        except (TypeError, ValueError):
            return 0


# --- the consumer -----------------------------------------------------------------------
class Consumer:
    def __init__(self, settings: Settings, credentials: Credentials, store, metrics):
        self.settings, self.credentials, self.store = settings, credentials, store
        self.processed, self.processing = metrics
        self.stopping = False
        self.connection = self.channel = None
        self.buffer: list[Delivery] = []
        self.retry_backoff = Backoff(*RETRY_BACKOFF)
        self.metrics_started = False
        self.dead_letter_exchange = settings.dead_letter_exchange
        self.status = OrderStatus(settings, credentials)

    # --- life cycle ---------------------------------------------------------------------
    def stop(self, signum=None, frame=None) -> None:
        if not self.stopping:
            log.info("got %s: finishing the messages in hand, then stopping",
                     signal.Signals(signum).name if signum else "stop")
        self.stopping = True

    def sleep(self, seconds: float) -> None:
        """Wait, serving RabbitMQ's heartbeats when connected; raises Stopping on SIGTERM."""
        deadline = time.monotonic() + seconds
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.connection is not None and self.connection.is_open:
                self.connection.process_data_events(time_limit=min(left, 0.25))
            else:
                time.sleep(min(left, 0.25))
        raise Stopping()

    def run(self) -> int:
        import pika.exceptions

        backoff = Backoff(*RECONNECT_BACKOFF)
        refresh_credentials = False
        while not self.stopping:
            try:
                if not self.store.connected:
                    self.store.connect()
                    log.info("connected to %s", self.store.describe())
                self.connect_rabbitmq(refresh_credentials)
                refresh_credentials = False
                self.start_metrics()
                backoff.reset()
                self.consume()
            except Stopping:
                break
            except pika.exceptions.ProbableAuthenticationError as e:
                refresh_credentials = True
                self.wait_before_retry(backoff, f"RabbitMQ refused this service's login ({e})")
            except pika.exceptions.ChannelClosedByBroker as e:
                hint = " (run: opsctl queues apply)" if e.reply_code == 404 else ""
                self.wait_before_retry(backoff, f"RabbitMQ closed the channel: {e.reply_code} "
                                                f"{e.reply_text}{hint}")
            except (pika.exceptions.AMQPError, OSError) as e:
                self.wait_before_retry(backoff, f"RabbitMQ connection lost or refused: "
                                                f"{one_line(e)}")
            except Unavailable as e:
                self.wait_before_retry(backoff, str(e))
            finally:
                self.close_rabbitmq()
        self.close_rabbitmq()
        self.store.close()
        log.info("stopped")
        return 0

    def wait_before_retry(self, backoff: Backoff, reason: str) -> None:
        delay = backoff.next()
        log.warning("%s; retrying in %.1fs", reason, delay)
        self.close_rabbitmq()
        try:
            self.sleep(delay)
        except Stopping:
            pass

    def start_metrics(self) -> None:
        if self.metrics_started:
            return
        metrics = serve_metrics(self.settings.metrics_port)
        self.metrics_started = True
        log.info("ready: consuming %s; metrics on %s", self.settings.queue, metrics)

    # --- RabbitMQ -----------------------------------------------------------------------
    def connect_rabbitmq(self, refresh_credentials: bool) -> None:
        import pika

        user, password = self.credentials.get("rabbitmq", refresh=refresh_credentials)
        params = pika.ConnectionParameters(
            host=self.settings.rabbitmq_host, port=self.settings.rabbitmq_port,
            credentials=pika.PlainCredentials(user, password), heartbeat=HEARTBEAT,
            blocked_connection_timeout=60, connection_attempts=1, socket_timeout=5,
            client_properties={"connection_name": self.settings.service})
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()  # the copies put back for another try are confirmed
        self.channel.basic_qos(prefetch_count=PREFETCH)
        self.buffer = []
        self.dead_letter_exchange = self.settings.dead_letter_exchange
        if self.dead_letter_exchange:
            try:  # passive: the topology is opsctl's; a publish to a missing one closes the channel
                self.channel.exchange_declare(self.dead_letter_exchange, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                log.error("dead-letter exchange %s: %s %s (run: opsctl queues apply); messages "
                          "that cannot be stored are rejected to the queue's own dead-lettering",
                          self.dead_letter_exchange, e.reply_code, e.reply_text)
                self.dead_letter_exchange = ""
                self.channel = self.connection.channel()
                self.channel.confirm_delivery()
                self.channel.basic_qos(prefetch_count=PREFETCH)
        self.channel.basic_consume(self.settings.queue, self.on_message, auto_ack=False)
        log.info("connected to RabbitMQ %s:%d, consuming %s (prefetch %d)",
                 self.settings.rabbitmq_host, self.settings.rabbitmq_port, self.settings.queue,
                 PREFETCH)

    def close_rabbitmq(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        self.buffer = []  # unacknowledged: the broker gives them to the next consumer
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:
                pass

    def on_message(self, channel, method, properties, body) -> None:
        self.buffer.append(Delivery(method.delivery_tag, properties, body, method.redelivered,
                                    exchange=method.exchange, routing_key=method.routing_key))

    def consume(self) -> None:
        while not self.stopping:
            if not self.buffer:
                self.connection.process_data_events(time_limit=0.5)
            self.connection.process_data_events(time_limit=0)
            if self.buffer:
                batch, self.buffer = self.buffer[:BATCH], self.buffer[BATCH:]
                self.handle(batch)
        # SIGTERM: the batch in hand is done; stop the deliveries and give back the rest.
        try:
            self.channel.stop_consuming()
            if self.buffer:
                for delivery in self.buffer:  # one by one: pika settled the undispatched ones
                    self.channel.basic_nack(delivery_tag=delivery.tag, requeue=True)
                log.info("gave back %d prefetched message(s)", len(self.buffer))
                self.buffer = []
        except Exception as e:
            log.warning("could not cancel the consumer cleanly: %s", e)
        raise Stopping()

    # --- one batch ----------------------------------------------------------------------
    def handle(self, batch: list[Delivery]) -> None:
        started = time.monotonic()
        good = []
        for delivery in batch:
            try:
                delivery.document = parse(delivery.body)
                good.append(delivery)
            except Poison as e:
                self.dead_letter(delivery, f"{e}; it can never be stored")
                self.processing.observe(time.monotonic() - started)
        if not good:
            return
        results = self.write(good)
        failed = []
        for delivery, result in zip(good, results):
            if isinstance(result, StoreRefused):
                if result.permanent:  # a data error: no wait, no retry, never stored
                    self.dead_letter(delivery, f"the store refuses it: {result}")
                    self.processing.observe(time.monotonic() - started)
                else:
                    failed.append((delivery, str(result)))
                continue
            self.channel.basic_ack(delivery.tag)
            self.processed.labels("stored" if result else "duplicate").inc()
            self.processing.observe(time.monotonic() - started)
        if not failed:
            self.retry_backoff.reset()
            return
        # Wait before the next try, so that a failing store does not use up the tries at
        # once (a SIGTERM here leaves them unacknowledged: the broker redelivers them).
        delay = self.retry_backoff.next()
        log.warning("%d message(s) failed; another try in %.2fs", len(failed), delay)
        self.sleep(delay)
        for delivery, reason in failed:
            self.retry(delivery, reason)
            self.processing.observe(time.monotonic() - started)

    def write(self, good: list[Delivery]) -> list[bool | StoreRefused]:
        """True (stored) / False (duplicate) / the store's refusal, per delivery. While the
        store is unreachable, waits and tries again (the messages stay unacknowledged)."""
        backoff = Backoff(*UNAVAILABLE_BACKOFF)
        held = False
        while True:
            try:
                try:
                    results = list(self.store.write([d.document for d in good]))
                    if held:
                        log.info("%s answers again: the %d held message(s) are written",
                                 self.store.describe(), len(good))
                    return results
                except StoreRefused as e:
                    if len(good) == 1:
                        return [e]
                    # Find which message is refused: one by one, the others go through.
                    results: list[bool | StoreRefused] = []
                    for delivery in good:
                        try:
                            results.append(self.store.write([delivery.document])[0])
                        except StoreRefused as single:
                            results.append(single)
                    return results
            except StoreUnavailable as e:
                delay = backoff.next()
                log.warning("%s; %d message(s) held, writing again in %.1fs", e, len(good), delay)
                held = True
                self.sleep(delay)  # raises Stopping on SIGTERM: the messages stay unacked
                try:
                    self.store.connect()
                except Unavailable:
                    pass  # the next write says so again, after the next wait

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """To DEAD_LETTER_EXCHANGE with the reason in its headers, confirmed, then the original
        acknowledged; the order's Redis entry says so."""
        import pika

        log.warning("dead-lettering message %s: %s", self.describe(delivery), reason)
        at = dt.datetime.now(dt.timezone.utc).isoformat()
        published = False
        if self.dead_letter_exchange:
            headers = {**(delivery.properties.headers or {}), "x-dead-letter-reason": reason[:1000],
                       "x-dead-letter-queue": self.settings.queue,
                       "x-dead-letter-routing-key": delivery.routing_key,
                       "x-dead-lettered-at": at, "x-dead-lettered-by": self.settings.service}
            try:
                self.channel.basic_publish(self.dead_letter_exchange, delivery.routing_key,
                                           delivery.body, self.copy(delivery, headers),
                                           mandatory=True)
                published = True
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
                log.error("could not publish message %s to %s (%s): rejected instead",
                          self.describe(delivery), self.dead_letter_exchange, e)
        if published:
            self.channel.basic_ack(delivery.tag)
        else:
            self.channel.basic_reject(delivery.tag, requeue=False)
        self.processed.labels("dead_lettered").inc()
        if delivery.document:
            self.status.dead_lettered(delivery.document, reason, at)

    @staticmethod
    def copy(delivery: Delivery, headers: dict):
        """The delivery's properties with these headers (user_id left out: the broker checks
        it is ours)."""
        import pika

        props = delivery.properties
        return pika.BasicProperties(
            content_type=props.content_type, content_encoding=props.content_encoding,
            headers=headers, delivery_mode=props.delivery_mode or 2, priority=props.priority,
            correlation_id=props.correlation_id, reply_to=props.reply_to,
            expiration=props.expiration, message_id=props.message_id, timestamp=props.timestamp,
            type=props.type, app_id=props.app_id)

    def retry(self, delivery: Delivery, reason: str) -> None:
        import pika

        tries = delivery.tries_before + 1
        if tries >= self.settings.attempts:
            self.dead_letter(delivery, f"try {tries} of {self.settings.attempts} failed: {reason}")
            return
        copy = self.copy(delivery, {**(delivery.properties.headers or {}), "x-attempts": tries})
        try:
            self.channel.basic_publish("", self.settings.queue, delivery.body, copy,
                                       mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
            log.error("could not put message %s back for another try (%s); it returns to the "
                      "queue as is", self.describe(delivery), e)
            self.channel.basic_nack(delivery.tag, requeue=True)
            return
        self.channel.basic_ack(delivery.tag)
        self.processed.labels("retried").inc()
        log.warning("message %s failed (try %d of %d): %s; put back for another try",
                    self.describe(delivery), tries, self.settings.attempts, reason)

    @staticmethod
    def describe(delivery: Delivery) -> str:
        if delivery.document:
            return f"order {delivery.document['order_id']}"
        return f"message_id={delivery.properties.message_id!r}"


def make_metrics():
    from prometheus_client import Counter, Histogram

    processed = Counter("messages_processed", "Order messages settled, by result",
                        ["result"])
    for result in ("stored", "duplicate", "retried", "dead_lettered"):
        processed.labels(result)
    processing = Histogram("message_processing_seconds",
                           "Seconds from taking a message's batch to settling the message",
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5,
                                    10, 30))
    return processed, processing


def start(name: str) -> Consumer:
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # its errors are reported here, once
    settings = Settings.from_env()
    credentials = Credentials()
    store = (PostgresStore if settings.store == "postgres" else MongoStore)(settings, credentials)
    consumer = Consumer(settings, credentials, store, make_metrics())
    log.info("%s starting: %s → %s", settings.service, settings.queue, store.describe())
    return consumer


def main() -> int:
    return run_worker("consumer", start)

if __name__ == "__main__":
    sys.exit(main())
