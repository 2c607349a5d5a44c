"""The order workers on the real local platform: the three consumers and the CDC bridge.

Each worker runs as `python -m order_services.<module>` with exactly the environment opsctl
gives it (service_env); orders are published with pika to order-exchange as order-creator
does, and the stores (PostgreSQL, MongoDB, Kafka) are read back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pika
import pytest

from tests.integration.conftest import NAMES, service_env
from tests.integration.helpers import TopicReader, stored, wait_for

pytestmark = pytest.mark.integration

EXCHANGE, DEAD_LETTER = NAMES.exchanges.orders, NAMES.queues.dead_letter
QUEUES = {"priority": NAMES.queues.priority, "regular": NAMES.queues.regular, "digital": NAMES.queues.digital}
WORKERS = ("premium-consumer", "regular-consumer", "digital-consumer", "cdc-bridge")


# --- helpers ----------------------------------------------------------------------------
class Worker:
    """One worker process with the environment opsctl would give it."""

    def __init__(self, platform, service: str, logs: Path, env: dict | None = None):
        self.service, self.module = service, platform.spec.services[service].module
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                    **(env if env is not None else service_env(platform, service))}
        self.cwd = platform.path
        self.logs = logs
        self.process: subprocess.Popen | None = None
        self.runs = 0

    @property
    def port(self) -> int:
        return int(self.env["METRICS_PORT"])

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.service}-{self.runs}.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 60) -> "Worker":
        import socket

        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                pytest.fail(f"metrics port {self.port} of {self.service} is already taken: "
                            "stop what listens there (opsctl services stop?)")
        self.runs += 1
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", self.module],
                                            env=self.env, cwd=self.cwd, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            umask=0o077)  # as opsctl starts it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.service} exited {self.process.returncode}:\n"
                                     f"{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"{self.service} not ready after {timeout}s:\n{self.log()[-3000:]}")

    def metrics(self) -> dict[str, float]:
        """'name{label="v"}' (or 'name') → value."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as opsctl stops it; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.service} ignored SIGTERM for {timeout}s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture(scope="module")
def topology(platform):
    code, steps = platform.first_install
    failed = {n: s.get("detail") for n, s in steps.items() if s["state"] == "failed"}
    assert not failed, f"the platform's install failed: {failed}"
    applied = platform.run("queues", "apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    # These tests run their own workers and read the queues and stores themselves.
    stopped = platform.run("services", "stop", *WORKERS)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    return platform


@pytest.fixture
def workers(topology, tmp_path):
    """start(service) → a ready Worker; every worker is stopped at the end of the test."""
    started: list[Worker] = []

    def start(service: str, env: dict | None = None) -> Worker:
        worker = Worker(topology, service, tmp_path, env).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def admin_connection(platform) -> pika.BlockingConnection:
    return platform.amqp(connection_attempts=10, retry_delay=1)


@pytest.fixture
def rabbit(topology):
    """A confirmed channel of the admin user; the order queues and the dead letters purged."""
    connection = admin_connection(topology)
    channel = connection.channel()
    for queue in (*QUEUES.values(), DEAD_LETTER):
        channel.queue_purge(queue)
    channel.confirm_delivery()
    yield channel
    if connection.is_open:
        connection.close()


def order(kind: str) -> dict:
    quantity, price = 2, 35.5
    return {
        "order_id": str(uuid.uuid4()), "type": kind,
        "customer": {"id": "c-1042", "name": "Ada Lovelace", "email": "ada@example.org"},
        "items": [{"product": "Lamp", "category": "home", "quantity": quantity, "price": price}],
        "total": round(quantity * price, 2),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


def publish(channel, document: dict | bytes, kind: str | None = None) -> None:
    """As order-creator publishes: persistent, message_id = order_id, confirmed."""
    if isinstance(document, dict):
        kind = kind or document["type"]
        body, message_id = json.dumps(document).encode(), document["order_id"]
    else:
        body, message_id = document, f"raw-{uuid.uuid4()}"
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                 message_id=message_id,
                                 priority=5 if kind == "priority" else None)
    channel.basic_publish(EXCHANGE, kind, body, props, mandatory=True)


class Paced(threading.Thread):
    """Publishes `documents` at about `rate` per second on its own connection."""

    def __init__(self, platform, documents: list[dict], rate: float):
        super().__init__(daemon=True)
        self.platform, self.documents, self.rate = platform, documents, rate
        self.published = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            connection = admin_connection(self.platform)
            channel = connection.channel()
            channel.confirm_delivery()
            started = time.monotonic()
            for i, document in enumerate(self.documents):
                publish(channel, document)
                self.published += 1
                ahead = started + (i + 1) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            connection.close()
        except BaseException as e:  # reported by the test
            self.error = e


def dead_letters(channel, expected: int, timeout: float = 60) -> list[tuple]:
    found: list[tuple] = []

    def more():
        method, props, body = channel.basic_get(DEAD_LETTER, auto_ack=True)
        if method is not None:
            found.append((props, body))
        return len(found) >= expected

    wait_for(more, timeout, what=f"{expected} message(s) in {DEAD_LETTER}")
    return found


# --- stores, read with the services' own credentials ------------------------------------
def vault_secrets(platform, service: str) -> dict:
    from order_services.secrets import KeycloakToken, VaultSecrets

    env = service_env(platform, service)
    return VaultSecrets(env["VAULT_ADDR"], env["VAULT_ROLE"],
                        KeycloakToken(env["OIDC_TOKEN_URL"], env["OIDC_CLIENT_ID"],
                                      env["OIDC_CLIENT_SECRET"]),
                        env["VAULT_SECRET_PATH"]).read()


class Postgres:
    """The premium consumer's view of PostgreSQL; reconnects after a server restart."""

    def __init__(self, platform):
        creds = vault_secrets(platform, "premium-consumer")
        self.params = dict(host="127.0.0.1", port=platform.port("postgres", "postgres"),
                           dbname=NAMES.postgres.database, user=creds["postgres_username"],
                           password=creds["postgres_password"], autocommit=True)
        self.conn = None

    def execute(self, query: str, params=None) -> list:
        import psycopg

        for _ in range(2):
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(**self.params)
            try:
                return self.conn.execute(query, params).fetchall()
            except psycopg.OperationalError:
                self.conn.close()
        raise AssertionError("PostgreSQL is not answering")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@pytest.fixture(scope="module")
def postgres(topology):
    pg = Postgres(topology)
    yield pg
    pg.close()


def priority_rows(pg: Postgres, ids: list[str]) -> dict[str, list]:
    """order_id → [documents] (a list, so that a duplicate would show)."""
    rows: dict[str, list] = {}
    if not pg.execute("SELECT to_regclass('priority_orders')")[0][0]:
        return rows
    for order_id, document in pg.execute(
            "SELECT order_id, document FROM priority_orders WHERE order_id = ANY(%s)", [ids]):
        rows.setdefault(order_id, []).append(document)
    return rows


@pytest.fixture(scope="module")
def mongo(topology):
    from pymongo import MongoClient

    creds = vault_secrets(topology, "regular-consumer")
    client = MongoClient(f"mongodb://127.0.0.1:{topology.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                         username=creds["mongodb_username"], password=creds["mongodb_password"],
                         authSource=NAMES.mongodb.database, tz_aware=True, serverSelectionTimeoutMS=10000)
    yield client[NAMES.mongodb.database]
    client.close()


# --- kafka ---------------------------------------------------------------------------
@pytest.fixture
def topic(topology):
    reader = TopicReader(topology)
    yield reader
    reader.close()


# --- settings ---------------------------------------------------------------------------
@pytest.mark.parametrize("service,missing", [("premium-consumer", "QUEUE"),
                                             ("regular-consumer", "MONGODB_URL"),
                                             ("cdc-bridge", "KAFKA_TOPIC")])
def test_missing_setting_exits_non_zero_naming_it(topology, service, missing):
    env = {k: v for k, v in service_env(topology, service).items() if k != missing}
    result = subprocess.run([sys.executable, "-m", topology.spec.services[service].module], capture_output=True,
                            text=True, timeout=60, cwd=topology.path,
                            env={"PATH": os.environ.get("PATH", ""), **env})
    assert result.returncode != 0
    assert missing in result.stderr and "missing" in result.stderr
    assert env["OIDC_CLIENT_SECRET"] not in result.stdout + result.stderr


# --- consumers --------------------------------------------------------------------------
def test_priority_orders_are_stored_once_in_postgres(workers, rabbit, postgres):
    worker = workers("premium-consumer")
    orders = [order("priority") for _ in range(20)]
    for document in orders + orders:  # every message twice: stored once
        publish(rabbit, document)
    ids = [o["order_id"] for o in orders]
    wait_for(lambda: worker.metric('messages_processed_total{result="stored"}') +
             worker.metric('messages_processed_total{result="duplicate"}') >= 40,
             what="40 messages processed")
    rows = priority_rows(postgres, ids)
    assert {k: len(v) for k, v in rows.items()} == {i: 1 for i in ids}
    assert all(rows[o["order_id"]][0] == o for o in orders)
    assert worker.metric('messages_processed_total{result="stored"}') == 20
    assert worker.metric('messages_processed_total{result="duplicate"}') == 20
    assert worker.metric("message_processing_seconds_count") == 40
    assert worker.stop() == 0
    assert "stopped" in worker.log()


def test_regular_and_digital_orders_are_stored_once_in_mongodb(workers, rabbit, mongo):
    regular, digital = workers("regular-consumer"), workers("digital-consumer")
    orders = {"regular": [order("regular") for _ in range(15)],
              "digital": [order("digital") for _ in range(15)]}
    for documents in orders.values():
        for document in documents + documents:
            publish(rabbit, document)
    for worker in (regular, digital):
        wait_for(lambda: worker.metric('messages_processed_total{result="stored"}') +
                 worker.metric('messages_processed_total{result="duplicate"}') >= 30,
                 what=f"{worker.service}: 30 messages processed")
        assert worker.metric('messages_processed_total{result="duplicate"}') == 15
    orders_, digital_ = NAMES.mongodb.orders, NAMES.mongodb.digital_orders
    for kind, collection, other in (("regular", orders_, digital_), ("digital", digital_, orders_)):
        ids = [o["order_id"] for o in orders[kind]]
        found = stored(mongo[collection], ids)
        assert {k: len(v) for k, v in found.items()} == {i: 1 for i in ids}
        for document in orders[kind]:
            saved = dict(found[document["order_id"]][0])
            assert isinstance(saved.pop("received_at"), dt.datetime)
            assert saved == {"_id": document["order_id"], **document}
        assert not stored(mongo[other], ids)
    assert regular.stop() == 0 and digital.stop() == 0


def test_malformed_message_is_dead_lettered_and_the_consumer_keeps_going(workers, rabbit, mongo):
    worker = workers("regular-consumer")
    publish(rabbit, b"{this is not json", "regular")
    publish(rabbit, json.dumps({"type": "regular", "total": 1}).encode(), "regular")  # no order_id
    good = order("regular")
    publish(rabbit, good)
    wait_for(lambda: stored(mongo[NAMES.mongodb.orders], [good["order_id"]]), what="the good order stored")
    letters = dead_letters(rabbit, 2)
    assert {body for _, body in letters} == {b"{this is not json",
                                            json.dumps({"type": "regular", "total": 1}).encode()}
    reasons = set()
    for props, _ in letters:
        assert props.headers["x-dead-letter-queue"] == NAMES.queues.regular
        assert props.headers["x-dead-letter-routing-key"] == "regular"
        reasons.add(props.headers["x-dead-letter-reason"].split(":")[0])
    assert reasons == {"not JSON", "no order_id (a non-empty string); it can never be stored"}
    assert worker.metric('messages_processed_total{result="dead_lettered"}') == 2
    assert worker.process.poll() is None


def test_data_the_store_refuses_is_dead_lettered_at_once(workers, rabbit, postgres):
    """PostgreSQL's jsonb refuses \\u0000: that is the data, not an outage; the message is
    dead-lettered at once (no tries, no wait for the queue), the orders around it stored."""
    worker = workers("premium-consumer")
    poison = order("priority")
    poison["customer"]["name"] = "Ada\u0000Lovelace"
    before, after = order("priority"), order("priority")
    started = time.monotonic()
    for document in (before, poison, after):
        publish(rabbit, document)
    [(props, body)] = dead_letters(rabbit, 1, timeout=30)
    took = time.monotonic() - started
    assert json.loads(body)["order_id"] == poison["order_id"]
    assert "x-attempts" not in props.headers
    assert props.headers["x-dead-letter-queue"] == NAMES.queues.priority
    assert "Unicode" in props.headers["x-dead-letter-reason"]
    assert props.message_id == poison["order_id"] and props.priority == 5
    assert took < 1.5, f"{took:.2f}s: the queue waited for a message that can never be stored"
    wait_for(lambda: len(priority_rows(postgres, [before["order_id"], after["order_id"]])) == 2,
             what="the orders around it stored")
    assert not priority_rows(postgres, [poison["order_id"]])
    assert worker.metric('messages_processed_total{result="retried"}') == 0
    assert worker.metric('messages_processed_total{result="dead_lettered"}') == 1


def test_a_passing_store_refusal_is_retried_then_dead_lettered(topology, workers, rabbit,
                                                               postgres):
    """A refusal that is not about the data (here a missing permission, from a trigger made
    for the test) is tried DELIVERY_ATTEMPTS times with a growing wait, then
    dead-lettered with the reason; the orders around it are stored."""
    import psycopg

    worker = workers("premium-consumer")  # it creates the table
    attempts = int(worker.env["DELIVERY_ATTEMPTS"])
    unlucky, before, after = order("priority"), order("priority"), order("priority")
    admin = psycopg.connect(host="127.0.0.1", port=topology.port("postgres", "postgres"),
                            dbname=NAMES.postgres.database, user="postgres", autocommit=True,
                            password=topology.admin_secret("postgres", "password"))
    admin.execute("CREATE OR REPLACE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ "
                  "BEGIN IF NEW.order_id = TG_ARGV[0] THEN RAISE EXCEPTION 'no' USING "
                  "ERRCODE = '42501'; END IF; RETURN NEW; END $$")
    admin.execute(f"CREATE TRIGGER test_refuse BEFORE INSERT ON priority_orders FOR EACH ROW "
                  f"EXECUTE FUNCTION test_refuse('{unlucky['order_id']}')")
    try:
        started = time.monotonic()
        for document in (before, unlucky, after):
            publish(rabbit, document)
        [(props, body)] = dead_letters(rabbit, 1, timeout=90)
        took = time.monotonic() - started
    finally:
        admin.execute("DROP TRIGGER IF EXISTS test_refuse ON priority_orders")
        admin.close()
    assert json.loads(body)["order_id"] == unlucky["order_id"]
    assert props.headers["x-attempts"] == attempts - 1
    assert props.headers["x-dead-letter-reason"].startswith(f"try {attempts} of {attempts} failed")
    assert "InsufficientPrivilege" in props.headers["x-dead-letter-reason"]
    assert took > 1.5, f"the {attempts} tries took only {took:.2f}s: no backoff"
    rows = priority_rows(postgres, [before["order_id"], unlucky["order_id"], after["order_id"]])
    assert set(rows) == {before["order_id"], after["order_id"]}
    assert worker.metric('messages_processed_total{result="retried"}') == attempts - 1
    assert worker.metric('messages_processed_total{result="dead_lettered"}') == 1
    assert worker.metric('messages_processed_total{result="stored"}') == 2
