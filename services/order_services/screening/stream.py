"""The streaming screening job: Kafka orders-topic → the VAE → RabbitMQ orders-validation
and each order's validation status in MongoDB.

Local target (opsctl jobs stream start): `python -m order_services.screening.stream`, Spark
in local mode. A cluster: the same file, unchanged, through spark-submit, e.g.
    spark-submit --master spark://host:7077 --jars <Kafka source jars> \\
      --py-files order_services.zip order_services/screening/stream.py
with the environment below; the model directory is shipped to the executors by the job
itself (SparkContext.addFile), so it only has to exist where the driver runs.

Settings (environment): KAFKA_BOOTSTRAP, KAFKA_TOPIC, MODEL_DIR, STATE_DIR (the checkpoint
lives in STATE_DIR/checkpoint), MONGODB_URL, MONGODB_DB, MONGODB_COLLECTION,
DEAD_LETTER_COLLECTION, RABBITMQ_HOST, RABBITMQ_PORT, ORDER_EXCHANGE,
VALIDATION_ROUTING_KEY, TRIGGER_SECONDS, METRICS_PORT, the Vault settings of
order_services.secrets (MongoDB and RabbitMQ credentials), and optionally SPARK_MASTER
(default local[*] unless spark-submit set one) and SPARK_JARS (comma-separated).

Per micro-batch (foreachBatch, so a restart from the checkpoint replays a batch that did
not finish): the driver reads the batch's customers' recent orders from MongoDB (the
recent-order feature needs them), the executors score with mapInPandas (the model loaded
once per Python worker), then the driver publishes the flagged orders (publisher
confirms, message_id = order_id) and sets `validation` on every order. An order whose
validation is already set is not published again, so a replayed batch flags nothing twice.
A record that cannot be scored (not JSON, a missing field) goes to DEAD_LETTER_COLLECTION
with the reason, keyed by topic partition and offset; the stream goes on.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("order_screening")

RESULT_SCHEMA = ("partition int, offset long, order_id string, score double, flagged boolean, "
                 "error string, value string, kafka_ms double")
_SCREENS: dict = {}  # model directory → Screen, once per Python worker


@dataclass
class Settings:
    kafka_bootstrap: str
    topic: str
    model_dir: str
    state_dir: str
    mongodb_url: str
    database: str
    collection: str
    dead_letters: str
    rabbitmq_host: str
    rabbitmq_port: int
    exchange: str
    routing_key: str
    trigger_seconds: float
    metrics_port: int

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        from order_services.worker import ConfigError

        names = {"kafka_bootstrap": "KAFKA_BOOTSTRAP", "topic": "KAFKA_TOPIC", "model_dir": "MODEL_DIR",
                 "state_dir": "STATE_DIR", "mongodb_url": "MONGODB_URL", "database": "MONGODB_DB",
                 "collection": "MONGODB_COLLECTION", "rabbitmq_host": "RABBITMQ_HOST",
                 "rabbitmq_port": "RABBITMQ_PORT", "exchange": "ORDER_EXCHANGE",
                 "metrics_port": "METRICS_PORT"}
        missing = [v for v in names.values() if not env.get(v)]
        if missing:
            raise ConfigError(f"missing environment variable(s): {', '.join(missing)}")
        values = {field: env[var] for field, var in names.items()}
        return cls(**{**values, "rabbitmq_port": int(values["rabbitmq_port"]),
                      "metrics_port": int(values["metrics_port"]),
                      "dead_letters": env.get("DEAD_LETTER_COLLECTION") or "screening_dead_letters",
                      "routing_key": env.get("VALIDATION_ROUTING_KEY") or "validation",
                      "trigger_seconds": float(env.get("TRIGGER_SECONDS") or 2)})


def score_partitions(model_name: str, history: dict[str, list[float]]):
    """The mapInPandas function: scores the Kafka records of a partition."""

    def run(frames):
        import numpy as np
        import pandas as pd
        from pyspark import SparkFiles

        from order_services.screening import features, model

        path = SparkFiles.get(model_name)
        if path not in _SCREENS:
            _SCREENS[path] = model.Screen.load(path)
        screen = _SCREENS[path]
        clock = features.CustomerClock.from_times(history)
        for frame in frames:
            out, rows, scored = [], [], []  # scored: the records that have a feature row
            for partition, offset, value, kafka_ts in zip(frame["partition"], frame["offset"], frame["value"],
                                                          frame["timestamp"]):
                record = {"partition": int(partition), "offset": int(offset), "order_id": None, "score": None,
                          "flagged": None, "error": None, "value": None,
                          "kafka_ms": pd.Timestamp(kafka_ts).timestamp() * 1000}
                try:
                    order = json.loads(value)
                    if not isinstance(order, dict) or not order.get("order_id"):
                        raise features.BadOrder("not an order: order_id is missing")
                    record["order_id"] = str(order["order_id"])
                    rows.append(features.vector(order, screen.schema, clock))
                    scored.append(record)
                except (ValueError, features.BadOrder) as e:  # JSONDecodeError is a ValueError
                    record["error"] = str(e) if isinstance(e, features.BadOrder) else f"not JSON: {e}"
                    record["value"] = value if isinstance(value, str) else None
                out.append(record)
            if rows:  # one pass of the network for the whole frame
                for record, score in zip(scored, screen.scores(np.asarray(rows, dtype=np.float32))):
                    record["score"] = float(score)
                    record["flagged"] = record["score"] > screen.threshold
            yield pd.DataFrame(out, columns=[c.split()[0] for c in RESULT_SCHEMA.split(", ")])

    return run


class Sinks:
    """MongoDB and RabbitMQ, as the driver writes a batch's results to them."""

    def __init__(self, settings: Settings, secrets):
        self.settings, self.secrets = settings, secrets
        self._mongo = self._channel = self._connection = None
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
                                      tz_aware=True, serverSelectionTimeoutMS=10000)
        return self._mongo[self.settings.database]

    def channel(self):
        if self._channel is None or self._channel.is_closed:
            import pika

            creds = self.secrets.read()
            self._connection = pika.BlockingConnection(pika.ConnectionParameters(
                host=self.settings.rabbitmq_host, port=self.settings.rabbitmq_port,
                credentials=pika.PlainCredentials(creds["rabbitmq_username"], creds["rabbitmq_password"]),
                heartbeat=30))
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        return self._channel

    def history(self, customers: list[str], since: dt.datetime) -> dict[str, list[float]]:
        """created_at of these customers' orders since `since` (seconds since the epoch)."""
        from order_services.screening.features import created_at_or_none

        found: dict[str, list[float]] = {}
        if not customers:
            return found
        for doc in self.mongo()[self.settings.collection].find(
                {"customer.id": {"$in": customers}}, {"customer.id": 1, "created_at": 1}):
            stamp = created_at_or_none(doc)
            if stamp is not None and stamp >= since.timestamp():
                found.setdefault(doc["customer"]["id"], []).append(stamp)
        return found

    def write(self, rows: list, batch_id: int, threshold: float, model_version: str) -> None:
        import pika
        from pymongo import UpdateOne

        db = self.mongo()
        orders = db[self.settings.collection]
        good = [r for r in rows if r.error is None]
        done = {d["_id"] for d in orders.find({"_id": {"$in": [r.order_id for r in good]},
                                                "validation.status": {"$exists": True}}, {"_id": 1})}
        now = dt.datetime.now(dt.timezone.utc)
        updates = []
        for r in good:
            if r.order_id in done:
                continue  # screened already: a replayed batch, or the same order twice on the topic
            done.add(r.order_id)
            status = "held" if r.flagged else "passed"
            if r.flagged:
                body = json.dumps({"order_id": r.order_id, "score": r.score, "threshold": threshold,
                                   "model": model_version, "flagged_at": now.isoformat()}).encode()
                self.channel().basic_publish(
                    self.settings.exchange, self.settings.routing_key, body,
                    pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                         message_id=r.order_id), mandatory=True)
                self.flagged.inc()
                self.latency.observe(max(0.0, time.time() - r.kafka_ms / 1000))
            updates.append(UpdateOne({"_id": r.order_id}, {"$set": {"validation": {
                "status": status, "score": r.score, "threshold": threshold, "model": model_version,
                "batch": batch_id, "screened_at": now,
                "kafka_at": dt.datetime.fromtimestamp(r.kafka_ms / 1000, dt.timezone.utc)}}}))
        if updates:
            orders.bulk_write(updates, ordered=False)
        self.scored.inc(len(updates))
        dead = [r for r in rows if r.error is not None]
        if dead:
            db[self.settings.dead_letters].bulk_write([UpdateOne(
                {"_id": f"{self.settings.topic}:{r.partition}:{r.offset}"},
                {"$set": {"reason": r.error, "value": r.value, "order_id": r.order_id, "at": now}},
                upsert=True) for r in dead], ordered=False)
            self.dead.inc(len(dead))


def process_batch(sinks: Sinks, model_name: str, meta: dict):
    from pyspark.sql import functions as F

    window = meta["schema"]["burst_window_s"]

    def run(frame, batch_id: int) -> None:
        started = time.monotonic()
        customers = frame.select(F.get_json_object("value", "$.customer.id").alias("c"),
                                 F.get_json_object("value", "$.created_at").alias("t"))
        bounds = customers.agg(F.min("t"), F.collect_set("c")).collect()[0]
        since = (dt.datetime.fromisoformat(bounds[0].replace("Z", "+00:00")) if bounds[0]
                 else dt.datetime.now(dt.timezone.utc)) - dt.timedelta(seconds=window)
        if since.tzinfo is None:
            since = since.replace(tzinfo=dt.timezone.utc)
        history = sinks.history([c for c in bounds[1] if c], since)
        rows = frame.mapInPandas(score_partitions(model_name, history), RESULT_SCHEMA).collect()
        sinks.write(rows, batch_id, meta["threshold"], meta["training"].get("to") or "")
        if rows:
            log.info("batch %d: %d records, %d flagged, %d dead-lettered in %.2f s", batch_id, len(rows),
                     sum(1 for r in rows if r.flagged), sum(1 for r in rows if r.error), time.monotonic() - started)

    return run


def main() -> int:
    logging.basicConfig(stream=sys.stdout, level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    from order_services.worker import ConfigError, serve_metrics

    name = os.environ.get("SERVICE_NAME") or "order-screening"
    try:
        from order_services.secrets import SecretsError, VaultSecrets

        settings = Settings.from_env()
        try:
            meta = json.loads(open(os.path.join(settings.model_dir, "model.json")).read())
        except OSError:
            raise ConfigError(f"no model in {settings.model_dir}: train one first (opsctl jobs train-vae)") from None
        try:
            secrets = VaultSecrets.from_env()
        except SecretsError as e:
            raise ConfigError(str(e)) from None
    except ConfigError as e:
        print(f"{name}: configuration error: {e}", file=sys.stderr, flush=True)
        return 2

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers need this job's packages
    builder = SparkSession.builder.appName(name).config("spark.sql.shuffle.partitions", "2") \
        .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
    if os.environ.get("SPARK_MASTER"):
        builder = builder.master(os.environ["SPARK_MASTER"])
    elif "spark.master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
        builder = builder.master("local[*]")
    if os.environ.get("SPARK_JARS"):
        builder = builder.config("spark.jars", os.environ["SPARK_JARS"])
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    model_name = os.path.basename(os.path.normpath(settings.model_dir))
    spark.sparkContext.addFile(settings.model_dir, recursive=True)  # shipped to every executor

    sinks = Sinks(settings, secrets)
    serve_metrics(settings.metrics_port)
    source = (spark.readStream.format("kafka")
              .option("kafka.bootstrap.servers", settings.kafka_bootstrap)
              .option("subscribe", settings.topic)
              .option("startingOffsets", "earliest")
              .option("failOnDataLoss", "false")
              .load()
              .selectExpr("partition", "offset", "CAST(value AS STRING) AS value", "timestamp"))
    query = (source.writeStream
             .foreachBatch(process_batch(sinks, model_name, meta))
             .option("checkpointLocation", os.path.join(settings.state_dir, "checkpoint"))
             .trigger(processingTime=f"{settings.trigger_seconds:g} seconds")
             .start())
    log.info("%s: %s %s → VAE (threshold %.4f) → %s/%s", name, settings.kafka_bootstrap, settings.topic,
             meta["threshold"], settings.exchange, settings.routing_key)

    def stop(*_):
        log.info("stopping after the batch in hand")
        query.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        query.awaitTermination()
    except Exception as e:  # the query failed: exit non-zero so the supervisor sees it
        log.error("the streaming query failed: %s", e)
        return 1
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
