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
confirms, all in flight at once, message_id = order_id) and sets `validation` on every
order in one transaction. An order whose validation is already set is not published
again, so a replayed batch flags nothing twice; a stop (SIGTERM) lets the batch in hand
finish first, so only a crash leaves one to replay.
A record that cannot be scored (not JSON, a missing field) goes to DEAD_LETTER_COLLECTION
with the reason, keyed by topic partition and offset; the stream goes on.
"""

from __future__ import annotations

import contextlib
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
CONFIRM_TIMEOUT = 30.0  # seconds a publish waits for the broker's confirm
MAX_RECORDS_PER_BATCH = 2000
IN_LIST = 25  # values per $in query: SecantusDB takes time that grows with the square of its length


def in_chunks(values: list) -> list[list]:
    return [values[i:i + IN_LIST] for i in range(0, len(values), IN_LIST)]


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
        from order_services.settings import Env

        names = {"kafka_bootstrap": "KAFKA_BOOTSTRAP", "topic": "KAFKA_TOPIC", "model_dir": "MODEL_DIR",
                 "state_dir": "STATE_DIR", "mongodb_url": "MONGODB_URL", "database": "MONGODB_DB",
                 "collection": "MONGODB_COLLECTION", "rabbitmq_host": "RABBITMQ_HOST",
                 "rabbitmq_port": "RABBITMQ_PORT", "exchange": "ORDER_EXCHANGE",
                 "metrics_port": "METRICS_PORT"}
        settings = Env(env)
        values = settings.require(*names.values())
        return cls(**{**{field: values[var] for field, var in names.items()},
                      "rabbitmq_port": settings.port("RABBITMQ_PORT"), "metrics_port": settings.port("METRICS_PORT"),
                      "dead_letters": settings.text("DEAD_LETTER_COLLECTION", "screening_dead_letters"),
                      "routing_key": settings.text("VALIDATION_ROUTING_KEY", "validation"),
                      "trigger_seconds": settings.seconds("TRIGGER_SECONDS", 2.0)})


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


class StopGate:
    """A stop waits for the batch in hand to finish (published and written), so a stopped
    job leaves nothing half done to replay. A batch that would begin after the stop was asked
    fails instead: Spark does not commit it, and the next start runs it."""

    def __init__(self):
        import threading

        self._lock, self.stopping = threading.Lock(), threading.Event()

    @contextlib.contextmanager
    def batch(self, batch_id: int):
        with self._lock:
            if self.stopping.is_set():
                raise RuntimeError(f"stopping: batch {batch_id} is left for the next start")
            yield

    def close(self) -> None:
        self.stopping.set()
        with self._lock:
            pass


def process_batch(sinks: Sinks, model_name: str, meta: dict, gate: StopGate):
    window = meta["schema"]["recent_window_s"]

    def run(frame, batch_id: int) -> None:
        with gate.batch(batch_id):
            screen_batch(sinks, model_name, meta, window, frame, batch_id)

    return run


def screen_batch(sinks: Sinks, model_name: str, meta: dict, window: float, frame, batch_id: int) -> None:
    from pyspark.sql import functions as F

    phases, mark = {}, time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        phases[name], mark = time.monotonic() - mark, time.monotonic()

    frame.persist()  # read from Kafka once: the customers first, then the scoring
    customers = frame.select(F.get_json_object("value", "$.customer.id").alias("c"),
                             F.get_json_object("value", "$.created_at").alias("t"))
    bounds = customers.agg(F.min("t"), F.collect_set("c")).collect()[0]
    since = (dt.datetime.fromisoformat(bounds[0].replace("Z", "+00:00")) if bounds[0]
             else dt.datetime.now(dt.timezone.utc)) - dt.timedelta(seconds=window)
    if since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    lap("read")
    history, screened = sinks.recent_orders([c for c in bounds[1] if c], since)
    lap("history")
    rows = frame.mapInPandas(score_partitions(model_name, history), RESULT_SCHEMA).collect()
    frame.unpersist()
    lap("scoring")
    sinks.write(rows, batch_id, meta["threshold"], meta["training"].get("to") or "", screened, lap)
    if rows:
        log.info("batch %d: %d records, %d flagged, %d dead-lettered in %.2f s (%s)", batch_id, len(rows),
                 sum(1 for r in rows if r.flagged), sum(1 for r in rows if r.error), sum(phases.values()),
                 ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items()))


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
    gate = StopGate()
    query = (source.writeStream
             .foreachBatch(process_batch(sinks, model_name, meta, gate))
             .option("checkpointLocation", os.path.join(settings.state_dir, "checkpoint"))
             .trigger(processingTime=f"{settings.trigger_seconds:g} seconds")
             .start())
    log.info("%s: %s %s → VAE (threshold %.4f) → %s/%s", name, settings.kafka_bootstrap, settings.topic,
             meta["threshold"], settings.exchange, settings.routing_key)

    import threading

    stoppers: list[threading.Thread] = []

    def stop(*_):
        log.info("stopping after the batch in hand")
        # From another thread: the handler runs in the main thread, inside awaitTermination's
        # call to the JVM, and a second call on that thread's py4j connection fails (reentrant).
        def finish_then_stop():
            gate.close()
            query.stop()

        stoppers.append(threading.Thread(target=finish_then_stop, name="stop-query"))
        stoppers[-1].start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serve_metrics(settings.metrics_port)  # ready (opsctl waits for these) once a stop is graceful
    try:
        query.awaitTermination()
    except Exception:
        if not gate.stopping.is_set():
            raise
        # a batch refused by the gate while stopping: the query ends with its error, as asked
    finally:
        # awaitTermination returns while query.stop() is still winding down: stopping the
        # SparkContext under it (as the caller does next) would fail that call.
        for stopper in stoppers:
            stopper.join()


def start_jvm(options: dict[str, str]) -> str:
    """Start the driver's JVM with these (not secret) options, or join spark-submit's, and
    say which master it has. pyspark puts every option it starts the JVM with on the JVM's
    command line, for anyone to read in ps: a secret is set after, into the running JVM."""
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized(conf=SparkConf().setAll(list(options.items())))
    return SparkConf().get("spark.master", "local[*]")  # the JVM's: spark-submit's --master too


def authenticated(builder, master: str, secrets):
    """On a cluster, every Spark connection is authenticated (spark.authenticate). A
    standalone master and its workers share a secret with the job: spark_auth_secret at the
    job's Vault path (the nodes get it from `opsctl jobs stream cluster-conf`); on Kubernetes,
    Spark makes one per application. Set in the driver's JVM, never in an argument or the
    environment."""
    from order_services.settings import ConfigError

    if master.startswith("k8s://"):
        return builder.config("spark.authenticate", "true")
    if not master.startswith("spark://"):
        return builder  # local mode: nothing listens beyond the loopback interface
    secret = secrets.read().get("spark_auth_secret")
    if not secret:
        raise ConfigError("Vault holds no spark_auth_secret for the streaming job: run opsctl install "
                          "(it generates one), then give it to the cluster (opsctl jobs stream cluster-conf)")
    return builder.config("spark.authenticate", "true").config("spark.authenticate.secret", secret)


def start(name: str) -> int:
    from order_services.screening.model import read_meta
    from order_services.secrets import VaultSecrets
    from order_services.settings import ConfigError

    logging.getLogger("aiormq").setLevel(logging.WARNING)
    settings = Settings.from_env()
    try:
        meta, _ = read_meta(settings.model_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    secrets = VaultSecrets.from_env()

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers need this job's packages
    # One PyTorch (OpenMP) thread per Python worker: Spark runs a worker per core already, and
    # more threads than cores spin-wait against each other and the platform's servers.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    options = {"spark.app.name": name, "spark.sql.shuffle.partitions": "2", "spark.ui.enabled": "false",
               "spark.sql.execution.arrow.pyspark.enabled": "true"}
    # No SPARK_MASTER: spark-submit's --master, or its default local[*] (a master set here
    # would override the one spark-submit was given).
    if os.environ.get("SPARK_MASTER"):
        options["spark.master"] = os.environ["SPARK_MASTER"]
    if os.environ.get("SPARK_JARS"):
        options["spark.jars"] = os.environ["SPARK_JARS"]
    master = start_jvm(options)
    builder = authenticated(SparkSession.builder.config(map=options), master, secrets)
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
