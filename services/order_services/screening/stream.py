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
Kubernetes the order-services image, services/images/order-services). The model directory is shipped to the executors by
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

from order_services.screening.sinks import Sinks

log = logging.getLogger("order_screening")

RESULT_SCHEMA = ("partition int, offset long, order_id string, score double, flagged boolean, "
                 "error string, value string, kafka_ms double")
_SCREENS: dict = {}  # model directory → Screen, once per Python worker
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
               "spark.sql.execution.arrow.pyspark.enabled": "true",
               # Hadoop's file system applies its own umask (022), not the process's: the
               # checkpoint stays its owner's only, like everything else under STATE_DIR.
               "spark.hadoop.fs.permissions.umask-mode": "077"}
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
