"""The AI screening end to end on the local target: simulated traffic with anomalies flows
API → MongoDB → Kafka → Spark (the VAE) → orders-validation, and matches offline scoring; the
same job on a Spark standalone cluster (client mode, and through spark-submit); the nightly
Airflow DAG run by a real Airflow against the platform."""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from opsctl.components.services import BundledService
from tests.integration.conftest import NAMES, REPO, cache_dir, free_ports, service_env, workdir_context
from tests.integration.helpers import process_of, wait_for

pytestmark = pytest.mark.integration
STREAM = "order-screening"


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

    return MongoClient(f"mongodb://127.0.0.1:{platform.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                       username="opsctl-admin", password=platform.admin_secret("mongodb", "admin_password"),
                       authSource="admin", tz_aware=True)[NAMES.mongodb.database]


def validation_messages(platform) -> list[dict]:
    """Everything in orders-validation, put back (a queue read by a person later)."""
    connection = platform.amqp()
    channel = connection.channel()
    bodies = []
    while True:
        method, _, body = channel.basic_get(NAMES.queues.validation, auto_ack=False)
        if method is None:
            break
        bodies.append(json.loads(body))
    connection.close()  # unacknowledged: they go back to the queue
    return bodies


def produce(platform, values: list[bytes]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": f"127.0.0.1:{platform.port('kafka', 'broker')}"})
    for value in values:
        producer.produce(NAMES.topics.orders, key=b"bad", value=value)
    assert producer.flush(30) == 0


def test_flagged_orders_are_held_for_validation_as_offline_scoring_flags_them(screening):
    db = mongo(screening)
    began = dt.datetime.now(dt.timezone.utc).isoformat()  # the API's created_at of this test's orders
    sent = screening.run("orders", "simulate", "--rate", "20", "--duration", "8", "--anomaly-rate", "0.15",
                         "--seed", "4", "-o", "json", check_json=True)
    assert sent.returncode == 0, sent.json
    bad = [b"{not json", json.dumps({"order_id": "no-items", "customer": {"id": "c"}}).encode()]
    produce(screening, bad)
    wait_for(lambda: db[NAMES.mongodb.orders].count_documents({}), 60, what="regular orders in MongoDB")

    started = screening.run("jobs", "stream", "start", "-o", "json", check_json=True)
    assert started.returncode == 0 and started.json["state"] == "changed", started.stderr
    # The topic also holds every order the earlier test modules sent (over 16,000 in a full
    # run, most of them flagged: they are unlike the training orders, and a few it cannot
    # score), screened in batches of 2,000 first.
    all_settled(db, 480, "every order screened")
    held = {d["_id"] for d in db[NAMES.mongodb.orders].find({"validation.status": "held"}, {"_id": 1})}
    # This test's orders, not the earlier modules' (most of those are flagged).
    ours = {d["_id"] for d in db[NAMES.mongodb.orders].find({"created_at": {"$gte": began}}, {"_id": 1})}
    assert ours
    assert 0 < len(held & ours) < len(ours) / 2, f"{len(held & ours)} of {len(ours)} flagged: expected a few"
    queued = validation_messages(screening)
    assert sorted(m["order_id"] for m in queued) == sorted(held)  # each once

    ours_dead = {"value": {"$in": [b.decode() for b in bad]}}
    dead = wait_for(lambda: list(db.screening_dead_letters.find(ours_dead))
                    if db.screening_dead_letters.count_documents(ours_dead) >= 2 else None,
                    60, what="the two bad records dead-lettered")
    assert sorted(d["reason"].split(":")[0] for d in dead) == ["items is missing or empty", "not JSON"]

    # Offline scoring of the same orders flags the same ones.
    export = Path(screening.path / "stored.jsonl")
    export.write_text("".join(json.dumps({**d, "order_id": d["_id"]}, default=str) + "\n"
                              for d in db[NAMES.mongodb.orders].find({}, {"validation": 0})))
    scored = screening.run("jobs", "score", str(export), "--out", str(export) + ".scores", "-o", "json",
                           check_json=True)
    assert scored.returncode == 0, scored.stderr
    offline = {json.loads(line)["order_id"] for line in Path(str(export) + ".scores").read_text().splitlines()
               if json.loads(line)["flagged"]}
    assert offline == held

    status = screening.run("jobs", "stream", "status", "-o", "json", check_json=True)
    assert status.returncode == 0 and status.json["flagged"] == len(held)
    assert status.json["dead_lettered"] == db.screening_dead_letters.count_documents({})


def listening(pids: set[int]) -> list[str]:
    """host:port of every TCP socket in LISTEN held by these processes (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                host = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                import ipaddress

                ip = ipaddress.IPv6Address(words)
                host = str(ip.ipv4_mapped or ip)
            found.append(f"{host}:{int(port, 16)}")
    return found


def children_of() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    found: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def proc(pid: int, part: str) -> bytes:
    """/proc/<pid>/<part>, or nothing for a process that has just ended."""
    try:
        return Path(f"/proc/{pid}/{part}").read_bytes()
    except (ProcessLookupError, FileNotFoundError):
        return b""


def tree(pid: int) -> set[int]:
    """The process and all its descendants."""
    known, found, todo = children_of(), set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo.extend(known.get(current, []))
    return found


def test_the_local_spark_driver_listens_on_loopback_only(screening):
    """Spark in local mode binds 127.0.0.1 (SPARK_LOCAL_IP): nothing of the job's driver, its
    JVM included, listens where another machine could reach it."""
    assert screening.run("jobs", "stream", "start").returncode == 0  # running already: unchanged
    driver = process_of(BundledService(STREAM, workdir_context(screening))).pid()
    assert driver, "the streaming job is not running"
    family = tree(driver)
    java = [p for p in family if b"java" in proc(p, "cmdline")]
    sockets = listening(family)
    assert java and sockets
    assert all(s.startswith("127.0.0.1:") for s in sockets), sockets


def test_a_restarted_stream_continues_from_its_checkpoint_and_flags_nothing_twice(screening):
    db = mongo(screening)
    before = len(validation_messages(screening))
    assert screening.run("jobs", "stream", "start").returncode == 0  # running already: unchanged
    log = process_of(BundledService(STREAM, workdir_context(screening))).logfile
    logged = log.stat().st_size
    assert screening.run("jobs", "stream", "stop").returncode == 0
    said = log.read_bytes()[logged:].decode(errors="replace")
    # Only the driver is signalled: its JVM stays up until the query has stopped.
    assert "stopping after the batch in hand" in said and "Traceback" not in said, said[-4000:]
    was = screened(db)
    more = screening.run("orders", "simulate", "--rate", "10", "--duration", "3", "--seed", "5")
    assert more.returncode == 0
    assert screening.run("jobs", "stream", "start").returncode == 0
    all_settled(db, 180, "the new orders screened", screened_over=was)
    held = db[NAMES.mongodb.orders].count_documents({"validation.status": "held"})
    assert len(validation_messages(screening)) == held >= before


def test_the_streams_checkpoint_is_its_owners_only(screening):
    """Spark's checkpoint under the job's STATE_DIR is private like everything under .opsctl/
    (Hadoop's file system applies a umask of its own, not the process's)."""
    from tests.integration.test_hardening import _open_to_others

    state = screening.path / ".opsctl" / "local" / "order-screening" / "state"
    assert (state / "checkpoint" / "offsets").is_dir()
    assert not _open_to_others(state)


def stream_row(platform) -> dict:
    result = platform.run("status", "-o", "json", check_json=True)
    return next(r for r in result.json["components"] if r["component"] == "order-screening")


def test_soak_idle_minutes_then_traffic_then_the_driver_killed_screens_every_order_once(screening):
    """The whole flow with every service and the stream on: idle for 3 minutes (RabbitMQ drops
    a connection whose heartbeats nobody serves after 60 s), then traffic with anomalies, all
    screened by the same job; then kill -9 of the job's driver while orders keep coming: the
    supervisor restarts it, it goes on from its checkpoint, and no order is screened twice or
    missed."""
    db = mongo(screening)
    stream = BundledService(STREAM, workdir_context(screening))
    assert screening.run("jobs", "stream", "start").returncode == 0
    wave = ["orders", "simulate", "--rate", "10", "--duration", "3", "--anomaly-rate", "0.3"]
    assert screening.run(*wave, "--seed", "11").returncode == 0  # opens the job's broker connection
    all_settled(db, 180, "wave 1 screened")
    driver, held = process_of(stream).pid(), db[NAMES.mongodb.orders].count_documents({"validation.status": "held"})
    restarts = stream_row(screening)["restarts"]

    time.sleep(180)
    assert screening.run(*wave, "--seed", "12").returncode == 0
    all_settled(db, 180, "the orders after 3 idle minutes screened")
    assert db[NAMES.mongodb.orders].count_documents({"validation.status": "held"}) > held, "nothing held after the pause"
    assert process_of(stream).pid() == driver and stream_row(screening)["restarts"] == restarts, \
        "the job died while idle"

    batches = lambda: {d["_id"]: d["validation"]["batch"]  # noqa: E731
                       for d in db[NAMES.mongodb.orders].find({"validation.batch": {"$exists": True}}, {"validation.batch": 1})}
    before = batches()
    os.kill(driver, signal.SIGKILL)
    assert screening.run(*wave, "--seed", "13").returncode == 0  # while the job is down
    all_settled(db, 240, "the orders sent while the job was down screened after its restart",
                screened_over=len(before))
    assert process_of(stream).pid() not in (None, driver)
    assert stream_row(screening)["restarts"] == restarts + 1
    after = batches()
    assert {k: after[k] for k in before} == before  # nothing screened again
    held_ids = sorted(d["_id"] for d in db[NAMES.mongodb.orders].find({"validation.status": "held"}, {"_id": 1}))
    assert sorted(m["order_id"] for m in validation_messages(screening)) == held_ids  # each once


class SparkCluster:
    """A Spark standalone master and one worker (1 core, 1 GiB) on 127.0.0.1, from the
    pyspark distribution of this environment, that authenticate every connection with the
    secret `opsctl jobs stream cluster-conf` gives (as its help says to set them up)."""

    def __init__(self, home: Path, platform):
        import pyspark

        self.home, self.spark_home = home, Path(pyspark.__file__).parent
        conf = platform.run("jobs", "stream", "cluster-conf")
        assert conf.returncode == 0, conf.stderr
        self.secret = conf.stdout.split("spark.authenticate.secret ", 1)[1].strip()
        self.properties = home / "auth.conf"
        self.properties.write_text(conf.stdout)
        self.properties.chmod(0o600)
        self.port, self.ui_port, self.worker_ui_port = free_ports(3)
        self.url = f"spark://127.0.0.1:{self.port}"
        self.work_dir = home / "work"
        self.processes: list[subprocess.Popen] = []

    def _start(self, name: str, *args: str) -> None:
        env = {**os.environ, "SPARK_HOME": str(self.spark_home), "SPARK_LOCAL_IP": "127.0.0.1",
               "SPARK_LOG_DIR": str(self.home), "SPARK_WORKER_DIR": str(self.work_dir)}
        with open(self.home / f"{name}.log", "ab") as log:  # a session of its own: killed as a group
            self.processes.append(subprocess.Popen(
                [str(self.spark_home / "bin" / "spark-class"), *args], env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> None:
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                    "--port", str(self.port), "--webui-port", str(self.ui_port),
                    "--properties-file", str(self.properties))
        wait_for(lambda: self.master().get("status") == "ALIVE", 60, interval=0.5, what="the Spark master")
        self._start("worker", "org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1",
                    "--webui-port", str(self.worker_ui_port), "--cores", "1", "--memory", "1g",
                    "--work-dir", str(self.work_dir), "--properties-file", str(self.properties))
        wait_for(lambda: self.master().get("aliveworkers") == 1, 60, interval=0.5, what="the Spark worker")

    def _json(self, port: int) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/", timeout=5) as answer:
                return json.loads(answer.read())
        except OSError:
            return {}

    def master(self) -> dict:
        return self._json(self.ui_port)

    def worker(self) -> dict:
        return self._json(self.worker_ui_port)

    def stop(self) -> None:
        for process in reversed(self.processes):  # the worker (and its executors), then the master
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.fixture
def spark_cluster(screening):
    home = Path(tempfile.mkdtemp(prefix="spark-cluster-", dir=screening.path))  # its logs kept with the platform's
    cluster = SparkCluster(home, screening)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def children(pid: int) -> list[int]:
    return children_of().get(pid, [])


def screened(db) -> int:
    return db[NAMES.mongodb.orders].count_documents({"validation.status": {"$exists": True}})


def unsettled(db) -> list[dict]:
    """A few stored orders the stream has neither screened nor dead-lettered (as unscorable)."""
    dead = [order_id for order_id in db.screening_dead_letters.distinct("order_id") if order_id]
    return list(db[NAMES.mongodb.orders].find({"validation.status": {"$exists": False}, "_id": {"$nin": dead}},
                               {"_id": 1, "created_at": 1, "customer.id": 1}).limit(5))


def all_settled(db, timeout: float, what: str, screened_over: int = 0) -> None:
    """Until every stored order is screened or dead-lettered, more than `screened_over`
    screened; a timeout names orders still waiting."""
    try:
        wait_for(lambda: screened(db) > screened_over and not unsettled(db), timeout, interval=1, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}: {screened(db)} screened (wanted over {screened_over}), "
                             f"still waiting: {unsettled(db)}") from None


def the_app(cluster: SparkCluster, other_than: str | None = None) -> dict | None:
    """Our running application on the master, once it has an executor on the worker."""
    apps = [a for a in cluster.master().get("activeapps", [])
            if a["name"] == "order-screening" and a["id"] != other_than]
    worker = cluster.worker()
    ran_here = {e["appid"] for e in worker.get("executors", []) + worker.get("finishedexecutors", [])}
    return next((a for a in apps if a["id"] in ran_here), None)


def test_the_stream_runs_on_a_spark_cluster_with_the_model_shipped_to_its_executors(screening, spark_cluster):
    """Client mode: the driver is the local order-screening service, the executors run on a
    standalone cluster; then the same job through the printed spark-submit command."""
    db = mongo(screening)
    was_running = screening.run("jobs", "stream", "status").returncode == 0
    try:
        started = screening.run("jobs", "stream", "start", "--master", spark_cluster.url,
                                "--conf", "spark.driver.host=127.0.0.1", "-o", "json", check_json=True)
        assert started.returncode == 0 and started.json["master"] == spark_cluster.url, started.stderr
        before = screened(db)
        assert screening.run("orders", "simulate", "--rate", "10", "--duration", "3", "--seed", "6").returncode == 0
        all_settled(db, 120, "the new orders screened on the cluster", screened_over=before)
        app = wait_for(lambda: the_app(spark_cluster), 30, interval=0.5, what="the job's executor on the worker")
        assert app["state"] == "RUNNING"
        # The model directory reached the executor through the job (an archive, unpacked there).
        assert list(spark_cluster.work_dir.glob(f"{app['id']}/*/vae/model.json")), "no model on the executor"
        # The cluster authenticates the job (spark.authenticate): its secret came from Vault
        # into the driver's JVM, never through an argument or the environment.
        driver = process_of(BundledService(STREAM, workdir_context(screening))).pid()
        for pid in tree(driver):
            for part in ("cmdline", "environ"):
                assert spark_cluster.secret.encode() not in proc(pid, part), part
        status = screening.run("jobs", "stream", "status", "-o", "json", check_json=True)
        assert status.returncode == 0 and status.json["master"] == spark_cluster.url
        # A restart opsctl makes by itself keeps the job on the cluster: nothing changed.
        again = screening.run("services", "start", "order-screening", "-o", "json", check_json=True)
        assert again.returncode == 0 and again.json["services"][0]["state"] == "unchanged", again.stdout

        # The same job without opsctl: the printed spark-submit command, its environment and the
        # one secret it names (the job continues from the same checkpoint).
        printed = screening.run("jobs", "stream", "submit-command", "--master", spark_cluster.url,
                                "--conf", "spark.driver.host=127.0.0.1", "-o", "json", check_json=True)
        assert printed.returncode == 0, printed.stderr
        assert set(printed.json["secret_env"]) == {"OIDC_CLIENT_SECRET"}
        secret = service_env(screening, "order-screening")["OIDC_CLIENT_SECRET"]
        assert secret not in printed.stdout
        assert screening.run("jobs", "stream", "stop").returncode == 0
        env = {**printed.json["env"], "OIDC_CLIENT_SECRET": secret, "PATH": os.environ["PATH"],
               "HOME": os.environ.get("HOME", "/root")}
        with open(spark_cluster.home / "submitted.log", "wb") as log:
            submitted = subprocess.Popen(printed.json["argv"], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            before = screened(db)
            assert screening.run("orders", "simulate", "--rate", "10", "--duration", "2", "--seed", "7").returncode == 0

            def all_screened():
                assert submitted.poll() is None, (spark_cluster.home / "submitted.log").read_text()[-3000:]
                return not unsettled(db) and screened(db) > before

            wait_for(all_screened, 120, interval=1, what="the new orders screened by the spark-submit job")
            second = wait_for(lambda: the_app(spark_cluster, other_than=app["id"]), 30, interval=0.5,
                              what="the spark-submit job's executor on the worker")
            assert list(spark_cluster.work_dir.glob(f"{second['id']}/*/vae/model.json"))
        finally:  # SIGTERM to the Python driver (spark-submit's child): it stops after the batch in hand
            for pid in children(submitted.pid):
                os.kill(pid, signal.SIGTERM)
            try:
                submitted.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(submitted.pid, signal.SIGKILL)
                submitted.wait(10)
        assert submitted.returncode == 0, (spark_cluster.home / "submitted.log").read_text()[-3000:]
    finally:  # back to local mode, as the other tests expect it
        restored = screening.run("jobs", "stream", "start", "-o", "json", check_json=True)
        if not was_running:
            screening.run("jobs", "stream", "stop")
    assert restored.returncode == 0 and restored.json["master"] == "local[*]", restored.stderr
    finished = wait_for(lambda: [a["state"] for a in spark_cluster.master().get("completedapps", [])
                                 if a["name"] == "order-screening"] == ["FINISHED"] * 2, 30, interval=0.5,
                        what="both of the job's applications finished on the cluster")
    assert finished and not spark_cluster.master()["activeapps"]


def test_airflow_runs_the_nightly_dag_export_retrain_and_score_against_the_platform(screening, tmp_path):
    """The DAG under manifests/ run by the real Airflow of scripts/setup (`airflow dags test`:
    every task in turn, no scheduler): it retrains from MongoDB without the held orders and
    scores what it exported."""
    airflow = REPO / ".venv-airflow" / "bin" / "airflow"
    assert airflow.exists(), "Airflow is not installed: run scripts/setup"
    model = screening.path / ".opsctl" / "models" / "vae" / "model.json"
    before = json.loads(model.read_text())["training"]
    db = mongo(screening)
    stored, held = db[NAMES.mongodb.orders].count_documents({}), db[NAMES.mongodb.orders].count_documents({"validation.status": "held"})
    assert held, "the earlier tests held some orders for validation"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "manifests" / "airflow" / "dags"),
               OPSCTL=f"{sys.executable} -m opsctl", OPSCTL_WORKDIR=str(screening.path),
               OPSCTL_CACHE_DIR=cache_dir())
    for args in (["db", "migrate"], ["dags", "test", "order_screening", "2026-01-02"]):
        result = subprocess.run([str(airflow), *args], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "state=success" in result.stdout + result.stderr
    after = json.loads(model.read_text())["training"]
    assert after["to"] > before["to"] and after["orders"] == stored - held
    scores = (screening.path / ".opsctl" / "orders-2026-01-02.jsonl.scores.jsonl").read_text().splitlines()
    assert len(scores) == stored


def test_stream_start_without_a_model_says_to_train_one(workdir):
    result = workdir.run("jobs", "stream", "start")
    assert result.returncode == 2 and "train one first: opsctl jobs train-vae" in result.stderr
