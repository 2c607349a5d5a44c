"""The streaming screening job: Kafka orders-topic → the VAE → RabbitMQ orders-validation
and each order's validation status in MongoDB.

Local target (opsctl jobs stream start): `python -m order_services.screening.stream`, Spark
in local mode; with `--master spark://HOST:PORT` (or k8s://…) this driver stays local and
the executors run on that cluster (client mode). Without opsctl: the same file, unchanged,
through spark-submit, as `opsctl jobs stream submit-command --master URL` prints it:
    spark-submit --master spark://HOST:PORT --deploy-mode client --name order-screening \\
      --jars <the Kafka source jars, as SPARK_JARS> \\
      --conf spark.pyspark.python=<a Python with the services' screening extra> \\
      <site-packages>/order_services/screening/stream.py
with the environment below (SPARK_MASTER and SPARK_JARS unset). The executors' Python must
import order_services (the services with their screening extra on every worker; on
Kubernetes the order-screening image). The model directory is shipped to the executors by
the job itself (a zip through SparkContext.addArchive, unpacked there as
SparkFiles.get(<directory name>)), so it and STATE_DIR only have to exist where the driver
runs. Both ways run against a standalone cluster in tests/integration/test_screening.py.

Settings (environment): KAFKA_BOOTSTRAP, KAFKA_TOPIC, MODEL_DIR, STATE_DIR (the checkpoint
lives in STATE_DIR/checkpoint), MONGODB_URL, MONGODB_DB, MONGODB_COLLECTION,
DEAD_LETTER_COLLECTION, RABBITMQ_HOST, RABBITMQ_PORT, ORDER_EXCHANGE,
VALIDATION_ROUTING_KEY, TRIGGER_SECONDS, METRICS_PORT, the Vault settings of
order_services.secrets (MongoDB and RabbitMQ credentials), and optionally SPARK_MASTER
(over spark-submit's --master; local[*] without either), SPARK_JARS (comma-separated) and
PYSPARK_SUBMIT_ARGS (pyspark's own: `--conf KEY=VALUE … pyspark-shell`).

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
import shutil
import signal
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("order_screening")

RESULT_SCHEMA = ("partition int, offset long, order_id string, score double, flagged boolean, "
                 "error string, value string, kafka_ms double")
_SCREENS: dict = {}  # model directory → Screen, once per Python worker
PUBLISH_PATIENCE = 120.0  # seconds a batch waits for a lost RabbitMQ before it fails
MAX_RECORDS_PER_BATCH = 2000


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
        import pandas as pd
        from pyspark import SparkFiles

        from order_services.screening import features, model

        path = SparkFiles.get(model_name)
        if path not in _SCREENS:
            _SCREENS[path] = model.Screen.load(path)
        screen = _SCREENS[path]
        clock = features.CustomerClock.from_times(history)
        for frame in frames:
            out, orders, parsed = [], [], []  # parsed: the records that hold an order
            for partition, offset, value, kafka_ts in zip(frame["partition"], frame["offset"], frame["value"],
                                                          frame["timestamp"]):
                record = {"partition": int(partition), "offset": int(offset), "order_id": None, "score": None,
                          "flagged": None, "error": None, "value": None,
                          "kafka_ms": pd.Timestamp(kafka_ts).timestamp() * 1000}
                out.append(record)
                try:
                    order = json.loads(value)
                except (TypeError, ValueError) as e:  # not JSON, or a record without a value
                    record.update(error=f"not JSON: {e}", value=value if isinstance(value, str) else None)
                    continue
                if not isinstance(order, dict) or not order.get("order_id"):
                    record.update(error="not an order: order_id is missing", value=value)
                    continue
                record["order_id"] = str(order["order_id"])
                orders.append(order)
                parsed.append((record, value))
            if orders:  # the whole frame's features, then one pass of the network
                scores, refused = screen.score_orders(orders, clock)
                for index, (record, value) in enumerate(parsed):
                    if index in refused:
                        record.update(error=refused[index], value=value)
                    else:
                        record["score"] = float(scores[index])
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
        """The confirming channel, opened when needed. Between batches nothing serves the
        connection's heartbeats, so the broker may have dropped it while the stream was idle:
        that shows here, as the error a publish would meet, and the caller reconnects."""
        if self._channel is None or self._channel.is_closed or not self._connection.is_open:
            import pika

            self.close_broker()
            creds = self.secrets.read()
            self._connection = pika.BlockingConnection(pika.ConnectionParameters(
                host=self.settings.rabbitmq_host, port=self.settings.rabbitmq_port,
                credentials=pika.PlainCredentials(creds["rabbitmq_username"], creds["rabbitmq_password"]),
                heartbeat=30, connection_attempts=1, socket_timeout=5,
                client_properties={"connection_name": "order-screening"}))
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        self._connection.process_data_events(time_limit=0)
        return self._channel

    def close_broker(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except Exception:
                pass

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish the flagged orders with confirms; a lost broker (a restart, a connection
        dropped while idle) is reconnected with a backoff for up to PUBLISH_PATIENCE seconds,
        then the batch fails (and is replayed from the checkpoint when the job restarts). A
        message published twice that way carries the same message_id (its order_id)."""
        import pika.exceptions

        deadline, delay = time.monotonic() + PUBLISH_PATIENCE, 0.5
        while True:
            try:
                channel = self.channel()
                for order_id, body in messages:
                    channel.basic_publish(
                        self.settings.exchange, self.settings.routing_key, body,
                        pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                             message_id=order_id), mandatory=True)
                return
            except (pika.exceptions.AMQPError, OSError) as e:
                self.close_broker()
                if isinstance(e, pika.exceptions.UnroutableError) or time.monotonic() > deadline:
                    raise
                log.warning("RabbitMQ connection lost (%s: %s); publishing %d flagged order(s) "
                            "again in %.1f s", type(e).__name__, e, len(messages), delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

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
        from pymongo import UpdateOne

        db = self.mongo()
        orders = db[self.settings.collection]
        good = [r for r in rows if r.error is None]
        done = {d["_id"] for d in orders.find({"_id": {"$in": [r.order_id for r in good]},
                                                "validation.status": {"$exists": True}}, {"_id": 1})}
        now = dt.datetime.now(dt.timezone.utc)
        updates, flagged = [], []
        for r in good:
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

    window = meta["schema"]["recent_window_s"]

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


def ship_model(sc, model_dir: str) -> tuple[str, str]:
    """Ships the model directory to every executor as a zip archive, unpacked there under
    the directory's name (SparkFiles.get(name)); addFile takes a local directory only in
    local mode. Returns that name and the temporary folder of the archive."""
    import pathlib
    import tempfile

    name = os.path.basename(os.path.normpath(model_dir))
    folder = tempfile.mkdtemp(prefix="order-screening-model-")
    archive = shutil.make_archive(os.path.join(folder, name), "zip", root_dir=model_dir)
    sc.addArchive(f"{pathlib.Path(archive).as_uri()}#{name}")
    return name, folder


def warm_up(spark, model_name: str) -> None:
    """Start the executors' Python workers and load the model in them before the first batch
    (Spark reuses the workers), so that the first orders do not wait seconds for PyTorch."""
    slots = spark.sparkContext.defaultParallelism
    now = dt.datetime.now(dt.timezone.utc)
    frame = spark.createDataFrame([(i, 0, "{}", now) for i in range(slots)],
                                  "partition int, offset long, value string, timestamp timestamp")
    frame.repartition(slots).mapInPandas(score_partitions(model_name, {}), RESULT_SCHEMA).collect()


def run_stream(spark, settings: Settings, sinks: Sinks, model_name: str, meta: dict, name: str) -> None:
    """Serve the metrics and run the query until it stops (SIGTERM, SIGINT) or fails."""
    from order_services.worker import serve_metrics

    serve_metrics(settings.metrics_port)
    source = (spark.readStream.format("kafka")
              .option("kafka.bootstrap.servers", settings.kafka_bootstrap)
              .option("subscribe", settings.topic)
              .option("startingOffsets", "earliest")
              .option("failOnDataLoss", "false")
              # A job catching up (a first start on a full topic, a restart after a while)
              # goes in steady batches, not one that holds every record at once.
              .option("maxOffsetsPerTrigger", MAX_RECORDS_PER_BATCH)
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
        # From another thread: the handler runs in the main thread, inside awaitTermination's
        # call to the JVM, and a second call on that thread's py4j connection fails (reentrant).
        import threading

        threading.Thread(target=query.stop, name="stop-query").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    query.awaitTermination()


def start(name: str) -> int:
    from order_services.screening.model import read_meta
    from order_services.secrets import SecretsError, VaultSecrets
    from order_services.worker import ConfigError

    logging.getLogger("pika").setLevel(logging.WARNING)
    settings = Settings.from_env()
    try:
        meta, _ = read_meta(settings.model_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    try:
        secrets = VaultSecrets.from_env()
    except SecretsError as e:
        raise ConfigError(str(e)) from None

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers need this job's packages
    # One PyTorch (OpenMP) thread per Python worker: Spark runs a worker per core already, and
    # more threads than cores spin-wait against each other and the platform's servers.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    builder = SparkSession.builder.appName(name).config("spark.sql.shuffle.partitions", "2") \
        .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
    # No SPARK_MASTER: spark-submit's --master, or its default local[*] (a master set here
    # would override the one spark-submit was given).
    if os.environ.get("SPARK_MASTER"):
        builder = builder.master(os.environ["SPARK_MASTER"])
    if os.environ.get("SPARK_JARS"):
        builder = builder.config("spark.jars", os.environ["SPARK_JARS"])
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    model_name, shipped = ship_model(spark.sparkContext, settings.model_dir)
    try:
        warm_up(spark, model_name)  # before the metrics port opens: "running" means ready to score
        run_stream(spark, settings, Sinks(settings, secrets), model_name, meta, name)
    except Exception as e:  # the job failed: exit non-zero so the supervisor sees it
        log.error("the streaming job failed: %s", e)
        return 1
    finally:
        spark.stop()
        shutil.rmtree(shipped, ignore_errors=True)
    return 0


def main() -> int:
    from order_services.worker import run_worker

    return run_worker("order-screening", start)


if __name__ == "__main__":
    sys.exit(main())
