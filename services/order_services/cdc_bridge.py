"""The CDC bridge: MongoDB change stream (inserts into MONGODB_DB.MONGODB_COLLECTION) → Kafka.

Run as `python -m order_services.cdc_bridge`; settings from the environment listed in
docs/ORDER_FLOW.md (MONGODB_URL, MONGODB_DB, MONGODB_COLLECTION, KAFKA_BOOTSTRAP,
KAFKA_TOPIC, STATE_DIR, METRICS_PORT and the Vault ones), MongoDB credentials from Vault.

One Kafka record per inserted document: key = order_id (the document's _id, UTF-8), value =
the document as JSON (dates as ISO-8601 strings). The producer is idempotent with acks=all.

At least once, never less:
- Events are read in batches; a batch is produced, then flushed; only once every record of
  it is acknowledged by Kafka is the change stream's resume token of its last event written
  to STATE_DIR/resume-token.json (temporary file, fsync, os.replace, fsync of the folder).
- On start the stream resumes after the saved token. A kill -9 between a flush and the save
  re-publishes that batch: duplicates are allowed, losses are not.
- Without a usable token (first start, unreadable file, or a token that no longer matches
  the server's history) the bridge opens the stream first, then re-scans the whole
  collection publishing every document, then follows the stream: a document inserted
  during the scan may come twice, none is missed.
- A token that no longer matches the server's history is detected, not trusted: MongoDB
  answers such a resume with an error (ChangeStreamHistoryLost, InvalidResumeToken …), but
  the local MongoDB-compatible server (SecantusDB) silently returns nothing for a token past
  its history (a store wiped and started afresh) — a silent loss. So the state file also
  records the event's clusterTime and its document's _id, and a start does not resume
  blindly: if that document is gone from the collection, or the server's cluster time is
  older than the token's, the collection is re-scanned; otherwise the stream is opened at
  the event's clusterTime and must give back the saved event itself (same token) before
  anything else, or the collection is re-scanned. After a re-scan, the stream's position
  is saved with the last scanned document as its anchor (there is no event to find again).

Metrics (http://METRICS_HOST:METRICS_PORT/metrics, served once the stream is open):
records_published_total, cdc_lag_seconds (now − time of the last published event, measured
when its batch was delivered; 0 while the stream is caught up), cdc_rescans_total.
SIGTERM/SIGINT: the batch in hand is delivered and its token saved, then connections close.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from order_services.cdc_records import State, record
from order_services.settings import ConfigError, Env
from order_services.worker import Backoff, Stopping, Unavailable, run_worker, serve_metrics

log = logging.getLogger("order_services.cdc_bridge")
KAFKA_LOG = logging.getLogger("order_services.cdc_bridge.librdkafka")
KAFKA_LOG.setLevel(logging.CRITICAL)  # see Bridge.on_kafka_error

BATCH = 500               # events per Kafka flush and token save, at most
BATCH_WINDOW = 0.2        # seconds spent gathering one batch, at most
AWAIT_MS = 500            # how long one getMore waits for new events
FIND_EVENT_TIMEOUT = 5.0  # seconds to find the saved event again when resuming
FLUSH_TIMEOUT = 10        # seconds per flush attempt (a flush is retried until delivered)
RECONNECT_BACKOFF = (0.5, 10.0)
# Answers of a server that cannot resume from the token: history lost, invalid or
# unparseable token, non-resumable stream, token of another namespace.
RESUME_ERRORS = {286, 260, 280, 9, 13, 40647}


class KafkaUnavailable(Unavailable):
    """Kafka refused or did not acknowledge records: publish again from the saved token."""


class ResumeInvalid(Exception):
    """The saved resume token cannot be used: re-scan the collection."""


# --- settings ---------------------------------------------------------------------------
@dataclass
class Settings:
    service: str
    mongodb_url: str
    database: str
    collection: str
    kafka_bootstrap: str
    topic: str
    state_dir: Path
    metrics_port: int

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        settings = Env(env)
        settings.require("MONGODB_URL", "MONGODB_DB", "MONGODB_COLLECTION", "KAFKA_BOOTSTRAP",
                         "KAFKA_TOPIC", "STATE_DIR", "METRICS_PORT")
        port = settings.port("METRICS_PORT")
        return cls(service=settings.text("SERVICE_NAME", "cdc-bridge"),
                   mongodb_url=env["MONGODB_URL"], database=env["MONGODB_DB"],
                   collection=env["MONGODB_COLLECTION"], kafka_bootstrap=env["KAFKA_BOOTSTRAP"],
                   topic=env["KAFKA_TOPIC"], state_dir=Path(env["STATE_DIR"]), metrics_port=port)


# --- the bridge -------------------------------------------------------------------------
class Bridge:
    def __init__(self, settings: Settings, vault):
        self.settings, self.vault = settings, vault
        self.state = State(settings.state_dir)
        self.stopping = False
        self.client = self.collection = self.producer = None
        self.metrics_started = False
        self._errors: list[str] = []
        self._last_kafka_error, self._last_kafka_error_at = "", 0.0
        self._attempt_started = time.monotonic()
        from prometheus_client import Counter, Gauge

        self.published = Counter("records_published", "Kafka records published and acknowledged")
        self.lag = Gauge("cdc_lag_seconds", "Seconds between the last published event's time "
                                            "and its delivery to Kafka (0 when caught up)")
        self.rescans = Counter("cdc_rescans", "Full re-scans of the collection (no usable token)")

    # --- life cycle ---------------------------------------------------------------------
    def stop(self, signum=None, frame=None) -> None:
        if not self.stopping:
            log.info("got %s: finishing the batch in hand, then stopping",
                     signal.Signals(signum).name if signum else "stop")
        self.stopping = True

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        if self.stopping:
            raise Stopping()

    def run(self) -> int:
        from pymongo.errors import OperationFailure, PyMongoError

        backoff = Backoff(*RECONNECT_BACKOFF)
        distrust_token = False
        try:
            while not self.stopping:
                self._attempt_started = time.monotonic()
                try:
                    if self.collection is None:
                        self.connect_mongodb()
                    if self.producer is None:
                        self.connect_kafka()
                    self.follow(distrust_token)
                except ResumeInvalid as e:
                    log.warning("the saved resume token cannot be used (%s): re-scanning the "
                                "whole collection; documents may be published again", e)
                    distrust_token = True
                    continue
                except OperationFailure as e:
                    if e.code in (13, 18):
                        self.close_mongodb()  # credentials: read them again from Vault
                    self.wait(backoff, f"MongoDB refused: {e}")
                except KafkaUnavailable as e:
                    self.drop_producer()
                    self.wait(backoff, str(e))
                except (PyMongoError, Unavailable) as e:
                    self.close_mongodb()
                    self.wait(backoff, f"{type(e).__name__}: {e}")
                else:
                    continue
                distrust_token = False
        except Stopping:
            pass
        self.close()
        log.info("stopped")
        return 0

    def wait(self, backoff: Backoff, reason: str) -> None:
        if time.monotonic() - self._attempt_started > 60:
            backoff.reset()  # it had been working for a while: start the waits afresh
        delay = backoff.next()
        log.warning("%s; retrying in %.1fs", reason, delay)
        self.sleep(delay)

    def start_metrics(self) -> None:
        if self.metrics_started:
            return
        metrics = serve_metrics(self.settings.metrics_port)
        self.metrics_started = True
        log.info("ready: %s.%s → Kafka %s; metrics on %s",
                 self.settings.database, self.settings.collection, self.settings.topic, metrics)

    # --- connections --------------------------------------------------------------------
    def connect_mongodb(self) -> None:
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        try:
            secrets = self.vault.read()
        except Exception as e:
            raise Unavailable(f"cannot read this service's secrets from Vault: {e}") from e
        try:
            user, password = secrets["mongodb_username"], secrets["mongodb_password"]
        except KeyError:
            raise ConfigError("Vault holds no MongoDB credentials for this service "
                              "(mongodb_username/mongodb_password): run opsctl vault apply") from None
        s = self.settings
        client = MongoClient(s.mongodb_url, username=user, password=password,
                             authSource=s.database, tz_aware=True,
                             serverSelectionTimeoutMS=5000, connectTimeoutMS=5000,
                             appname=s.service)
        try:
            client[s.database].command("ping")
        except PyMongoError:
            client.close()
            raise
        self.client, self.collection = client, client[s.database][s.collection]
        log.info("connected to MongoDB %s.%s", s.database, s.collection)

    def close_mongodb(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
        self.client = self.collection = None

    def connect_kafka(self) -> None:
        from confluent_kafka import KafkaError, KafkaException, Producer
        from confluent_kafka.admin import AdminClient, NewTopic

        s = self.settings
        admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap, "client.id": s.service})
        try:
            topics = admin.list_topics(timeout=10).topics
            if s.topic not in topics:
                future = admin.create_topics([NewTopic(s.topic, num_partitions=1,
                                                       replication_factor=1)])[s.topic]
                try:
                    future.result(timeout=15)
                    log.info("created Kafka topic %s (1 partition, replication 1)", s.topic)
                except KafkaException as e:
                    if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
        except KafkaException as e:
            raise KafkaUnavailable(f"Kafka {s.kafka_bootstrap}: {e}") from e
        self.producer = Producer({
            "bootstrap.servers": s.kafka_bootstrap, "client.id": s.service,
            "acks": "all", "enable.idempotence": True, "linger.ms": 5,
            "delivery.timeout.ms": 120000,
            # librdkafka logs every reconnect attempt; its errors are reported once here
            "logger": KAFKA_LOG, "error_cb": self.on_kafka_error,
        })

    def drop_producer(self) -> None:
        """Forget what the producer still holds (it is published again from the saved token)
        and make a new one, after checking the topic again."""
        if self.producer is not None:
            try:
                self.producer.purge()
                self.producer.flush(0)
            except Exception:
                pass
            self.producer = None

    def close(self) -> None:
        if self.producer is not None:
            left = self.producer.flush(FLUSH_TIMEOUT)
            if left:
                log.warning("%d record(s) not delivered at exit; they are published again at "
                            "the next start (their token was not saved)", left)
            self.producer = None
        self.close_mongodb()

    # --- publishing ---------------------------------------------------------------------
    def on_kafka_error(self, error) -> None:
        text, now = str(error), time.monotonic()
        if self._last_kafka_error != text or now - self._last_kafka_error_at > 30:
            log.warning("Kafka: %s", text)
            self._last_kafka_error, self._last_kafka_error_at = text, now

    def on_delivery(self, error, message) -> None:
        if error is not None:
            self._errors.append(f"{message.key()!r}: {error}")

    def publish(self, documents: list[dict]) -> None:
        """Produce the records and wait until Kafka acknowledged every one of them."""
        from confluent_kafka import KafkaException

        self._errors = []
        for document in documents:
            key, value = record(document)
            while True:
                try:
                    self.producer.produce(self.settings.topic, key=key, value=value,
                                          on_delivery=self.on_delivery)
                    break
                except BufferError:  # the local queue is full: let it drain
                    self.producer.poll(0.1)
                except KafkaException as e:
                    raise KafkaUnavailable(f"Kafka refused a record: {e}") from e
            self.producer.poll(0)
        while True:
            left = self.producer.flush(FLUSH_TIMEOUT)
            if not left:
                break
            log.warning("Kafka has not acknowledged %d record(s) yet; still waiting", left)
            if self.stopping:
                raise KafkaUnavailable(f"stopping with {left} record(s) unacknowledged")
        if self._errors:
            raise KafkaUnavailable(f"{len(self._errors)} record(s) not delivered to Kafka, e.g. "
                              f"{self._errors[0]}; publishing again from the saved token")
        self.published.inc(len(documents))

    # --- the stream ---------------------------------------------------------------------
    def server_time(self):
        """The server's current cluster time (a bson Timestamp), or None."""
        reply = self.client[self.settings.database].command("ping")
        return reply.get("operationTime") or (reply.get("$clusterTime") or {}).get("clusterTime")

    def usable_state(self, distrust: bool) -> dict | None:
        """The saved position, unless it visibly does not belong to this server's history."""
        from bson import Timestamp

        saved = None if distrust else self.state.load()
        if saved is None:
            return None
        document_id = saved.get("document_id")
        if self.collection.find_one({"_id": document_id}, {"_id": 1}) is None:
            log.warning("saved resume token not used: the document of its event (%r) is no "
                        "longer in the collection (was the store wiped?)", document_id)
            return None
        saved_time = saved.get("cluster_time")
        if saved_time:
            now = self.server_time()
            if isinstance(now, Timestamp) and \
                    (now.time, now.inc) < (saved_time["t"], saved_time["i"]):
                log.warning("saved resume token not used: its cluster time %s is ahead of the "
                            "server's %s (the server's history was reset)", saved_time, now)
                return None
        return saved

    def open_stream(self, token: dict | None = None, start_at=None):
        from pymongo.errors import OperationFailure

        pipeline = [{"$match": {"operationType": "insert"}}]
        try:
            return self.collection.watch(pipeline, resume_after=token, start_at_operation_time=start_at,
                                         max_await_time_ms=AWAIT_MS)
        except OperationFailure as e:
            if (token or start_at) is not None and e.code in RESUME_ERRORS:
                raise ResumeInvalid(f"{e.code} {e.details.get('codeName', '')}: "
                                    f"{e.details.get('errmsg', e)}") from e
            raise

    def find_saved_event(self, stream, token: dict, at) -> None:
        """Read the stream (opened at the saved event's cluster time) up to the saved event
        itself; raise ResumeInvalid if the server's history does not hold it. A server may
        answer a resume token past its history with silence instead of an error."""
        deadline = time.monotonic() + FIND_EVENT_TIMEOUT
        while time.monotonic() < deadline and not self.stopping:
            event = stream.try_next()
            if event is None:
                continue
            if event["_id"] == token:
                return
            cluster_time = event.get("clusterTime")
            if cluster_time is not None and (cluster_time.time, cluster_time.inc) > (at.time, at.inc):
                raise ResumeInvalid("the saved token's event is not in the server's history "
                                    "(a later event came first)")
        if self.stopping:
            raise Stopping()
        raise ResumeInvalid(f"the saved token's event was not found in the server's history "
                            f"within {FIND_EVENT_TIMEOUT}s")

    def follow(self, distrust_token: bool) -> None:
        from bson import Timestamp
        from pymongo.errors import OperationFailure

        saved = self.usable_state(distrust_token)
        token = saved["token"] if saved else None
        if saved and saved.get("kind") == "event" and saved.get("cluster_time"):
            at = Timestamp(saved["cluster_time"]["t"], saved["cluster_time"]["i"])
            stream = self.open_stream(start_at=at)
            try:
                self.find_saved_event(stream, token, at)
            except BaseException:
                stream.close()
                raise
            log.info("resuming the change stream after the saved token")
        elif saved:
            stream = self.open_stream(token)
            log.info("resuming the change stream after the saved position")
        else:
            # Stream first, then the scan: nothing inserted in between is missed.
            now = self.server_time()
            stream = self.open_stream()
            self.rescans.inc()
            count, last_id = self.rescan()
            if last_id is not None and stream.resume_token is not None:
                # No event to find again later: the anchor is the last document scanned.
                self.state.save("position", stream.resume_token, now, last_id)
            log.info("re-scan published %d document(s); following the change stream", count)
        self.start_metrics()
        try:
            with stream:
                while not self.stopping:
                    events = self.next_batch(stream)
                    if not events:
                        self.lag.set(0)
                        continue
                    self.publish([e["fullDocument"] for e in events])
                    last = events[-1]
                    self.state.save("event", last["_id"], last.get("clusterTime"),
                                    last["documentKey"]["_id"])
                    self.lag.set(max(0.0, time.time() - event_time(last)))
        except OperationFailure as e:
            if token is not None and e.code in RESUME_ERRORS:
                raise ResumeInvalid(f"{e.code}: {e.details.get('errmsg', e)}") from e
            raise
        raise Stopping()

    def next_batch(self, stream) -> list[dict]:
        events: list[dict] = []
        deadline = time.monotonic() + BATCH_WINDOW
        while len(events) < BATCH and not self.stopping:
            event = stream.try_next()
            if event is None:
                break
            if event.get("operationType") == "insert" and event.get("fullDocument") is not None:
                events.append(event)
            if time.monotonic() > deadline:
                break
        return events

    def rescan(self) -> tuple[int, Any]:
        """Publish every document of the collection; (count, _id of the last one)."""
        log.info("re-scanning %s.%s", self.settings.database, self.settings.collection)
        count, last_id, chunk = 0, None, []
        for document in self.collection.find({}, batch_size=1000):
            chunk.append(document)
            if len(chunk) >= 5000:
                self.publish(chunk)
                count, last_id, chunk = count + len(chunk), chunk[-1]["_id"], []
            if self.stopping:
                raise Stopping()
        if chunk:
            self.publish(chunk)
            count, last_id = count + len(chunk), chunk[-1]["_id"]
        return count, last_id


def event_time(event: dict) -> float:
    wall = event.get("wallTime")
    if isinstance(wall, dt.datetime):
        if wall.tzinfo is None:
            wall = wall.replace(tzinfo=dt.timezone.utc)
        return wall.timestamp()
    cluster = event.get("clusterTime")
    return float(cluster.time) if cluster is not None else time.time()


def start(name: str) -> Bridge:
    from order_services.secrets import VaultSecrets

    settings = Settings.from_env()
    bridge = Bridge(settings, VaultSecrets.from_env())
    log.info("%s starting: %s.%s → Kafka %s at %s", settings.service, settings.database,
             settings.collection, settings.topic, settings.kafka_bootstrap)
    return bridge


def main() -> int:
    return run_worker("cdc-bridge", start)

if __name__ == "__main__":
    sys.exit(main())
