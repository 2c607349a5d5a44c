"""The whole order flow on the real servers, with the services started by opsctl:
API → RabbitMQ → consumers → PostgreSQL / MongoDB → CDC → Kafka."""

import os
import signal
import threading
import time
import uuid

import httpx
import pytest

from tests.integration.conftest import NAMES, workdir_context
from tests.integration.helpers import TopicReader, process_of, stored, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def flow(platform):
    assert platform.run("queues", "apply").returncode == 0
    code, steps = platform.steps("--only", "services")
    assert code == 0, steps
    assert steps["services"]["state"] == "changed"
    yield platform
    platform.run("services", "stop")


def people_token(platform) -> str:
    return platform.run("token", "-o", "json", check_json=True).json["access_token"]


def new_order(kind: str) -> dict:
    return {"customer": {"id": f"c-{uuid.uuid4().hex[:8]}", "name": "Test Client"},
            "items": [{"product": "Laptop", "category": "electronics", "quantity": 1, "price": 420.0}],
            "type": kind}


def orders_url(platform) -> str:
    return f"http://127.0.0.1:{workdir_context(platform).spec.services['order-creator'].port}/orders"


def place(platform, kind: str) -> dict:
    response = httpx.post(orders_url(platform), json=new_order(kind),
                          headers={"Authorization": f"Bearer {people_token(platform)}"}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def test_services_run_and_report_healthy(flow):
    status = flow.run("services", "status", "-o", "json", check_json=True)
    assert status.returncode == 0, status.json
    assert {s["component"] for s in status.json["services"]} == {
        "order-creator-blue", "order-creator-green", "stock-service-blue", "stock-service-green",
        "premium-consumer", "regular-consumer", "digital-consumer", "cdc-bridge"}
    code, steps = flow.steps("--only", "services")
    assert code == 0 and steps["services"]["state"] == "unchanged"


def test_each_order_type_reaches_its_store_and_regular_orders_reach_kafka(flow):
    import psycopg
    from pymongo import MongoClient

    priority, regular, digital = (place(flow, kind) for kind in ("priority", "regular", "digital"))

    with psycopg.connect(host="127.0.0.1", port=flow.port("postgres", "postgres"), user="postgres",
                         password=flow.admin_secret("postgres", "password"), dbname=NAMES.postgres.database) as conn:
        row = wait_for(lambda: conn.execute(
            "SELECT document FROM priority_orders WHERE order_id = %s", [priority["order_id"]]).fetchone(),
            what="the priority order in PostgreSQL")
    assert row[0]["total"] == priority["total"]

    with MongoClient(f"mongodb://127.0.0.1:{flow.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                     username="opsctl-admin", password=flow.admin_secret("mongodb", "admin_password"),
                     authSource="admin") as mongo:
        db = mongo[NAMES.mongodb.database]
        assert wait_for(lambda: db[NAMES.mongodb.orders].find_one({"_id": regular["order_id"]}), what="the regular order")
        assert wait_for(lambda: db[NAMES.mongodb.digital_orders].find_one({"_id": digital["order_id"]}), what="the digital order")
        assert db[NAMES.mongodb.orders].count_documents({"_id": {"$in": [priority["order_id"], digital["order_id"]]}}) == 0

    topic = TopicReader(flow)  # from the start: the shared topic may hold many records already
    try:
        keys = topic.wait_for_keys([regular["order_id"]], timeout=60)
        assert keys[regular["order_id"]] >= 1
        assert dict(topic.records)[regular["order_id"]]["order_id"] == regular["order_id"]
    finally:
        topic.close()


def test_simulated_traffic_is_all_accepted(flow):
    result = flow.run("orders", "simulate", "--rate", "40", "--duration", "2", "--seed", "1",
                      "-o", "json", check_json=True)
    assert result.returncode == 0, result.json
    assert result.json["sent"] == 80 and result.json["accepted"] == 80
    assert result.json["latency_ms"]["p99"] is not None


def test_prometheus_scrapes_the_services(flow):
    from opsctl import httpclient

    url = f"http://127.0.0.1:{flow.port('prometheus-grafana', 'http')}/api/v1/targets"

    def services_up():
        targets = httpclient.get(url)["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        return all(health.get(s) == "up" for s in ("order-creator", "premium-consumer", "cdc-bridge")) and health

    health = wait_for(services_up, 60, what="Prometheus to scrape the services")
    assert health["rabbitmq"] == "up" and health["prometheus"] == "up"


def test_prometheus_has_the_order_queues_depth_and_rates(flow):
    from opsctl import httpclient

    base = f"http://127.0.0.1:{flow.port('prometheus-grafana', 'http')}/api/v1/query"

    def series(query: str):
        return httpclient.get(f"{base}?query={query}")["data"]["result"]

    depth = wait_for(lambda: series("rabbitmq_queue_messages_ready"), 60, what="queue depth in Prometheus")
    assert {NAMES.queues.priority, NAMES.queues.regular, NAMES.queues.digital} <= {s["metric"]["queue"] for s in depth}
    assert series("rabbitmq_queue_messages_published_total") or series("rabbitmq_global_messages_received_total")


class SteadyLoad(threading.Thread):
    """A client placing orders at about `rate` per second until stopped, round-robin over
    the three types; remembers every order the API accepted (201) and counts the rest."""

    KINDS = ("priority", "regular", "digital")

    def __init__(self, platform, rate: float):
        super().__init__(daemon=True)
        self.url, self.token, self.rate = orders_url(platform), people_token(platform), rate
        self.accepted: dict[str, str] = {}  # order id → type
        self.refused = 0
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {self.token}"}) as client:
            started, sent = time.monotonic(), 0
            while not self.done.is_set():
                kind = self.KINDS[sent % 3]
                try:
                    response = client.post(self.url, json=new_order(kind))
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code == 201:
                    self.accepted[response.json()["order_id"]] = kind
                else:
                    self.refused += 1  # not accepted (503 while RabbitMQ restarts): not owed
                sent += 1
                time.sleep(max(0.0, started + sent / self.rate - time.monotonic()))

    def ids(self, kind: str) -> list[str]:
        return [order_id for order_id, k in self.accepted.items() if k == kind]


def test_no_accepted_order_is_lost_when_workers_die_and_rabbitmq_restarts_under_load(flow):
    """Each store keys its orders by id (a primary key, Mongo's _id), so "once" is the schema's
    promise; what this proves is that every order answered 201 got there."""
    import psycopg
    from pymongo import MongoClient

    from opsctl.components import build
    from opsctl.components.services import BundledService

    ctx = workdir_context(flow)
    load = SteadyLoad(flow, rate=30)
    load.start()

    def accepting_more(than: int) -> bool:
        return len(load.accepted) > than + 30

    wait_for(lambda: accepting_more(0), 30, what="the API to accept orders")
    for name in ("premium-consumer", "regular-consumer", "digital-consumer", "cdc-bridge"):
        os.kill(process_of(BundledService(name, ctx)).pid(), signal.SIGKILL)
        before = len(load.accepted)
        wait_for(lambda: accepting_more(before), 30, what=f"orders accepted while {name} is down")
        restart = flow.run("services", "start", name)
        assert restart.returncode == 0, restart.stdout + restart.stderr

    assert build("rabbitmq", ctx).stop()  # as `opsctl down` stops it
    code, steps = flow.steps("--only", "rabbitmq")
    assert code == 0 and steps["rabbitmq"]["state"] == "changed", steps
    before = len(load.accepted)
    wait_for(lambda: accepting_more(before), 60, what="orders accepted after RabbitMQ restarted")
    load.done.set()
    load.join(30)

    priority, regular, digital = (load.ids(kind) for kind in SteadyLoad.KINDS)
    with psycopg.connect(host="127.0.0.1", port=flow.port("postgres", "postgres"), user="postgres",
                         password=flow.admin_secret("postgres", "password"), dbname=NAMES.postgres.database) as conn:
        wait_for(lambda: conn.execute("SELECT count(*) FROM priority_orders WHERE order_id = ANY(%s)",
                                      [priority]).fetchone()[0] == len(priority),
                 120, what=f"{len(priority)} priority orders in PostgreSQL")

    with MongoClient(f"mongodb://127.0.0.1:{flow.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                     username="opsctl-admin", password=flow.admin_secret("mongodb", "admin_password"),
                     authSource="admin") as mongo:
        for collection, ids in ((mongo[NAMES.mongodb.database][NAMES.mongodb.orders], regular), (mongo[NAMES.mongodb.database][NAMES.mongodb.digital_orders], digital)):
            wait_for(lambda: len(stored(collection, ids)) == len(ids), 120,
                     what=f"{len(ids)} orders in {collection.name}")

    topic = TopicReader(flow)
    try:
        on_topic = topic.wait_for_keys(regular, timeout=120)
    finally:
        topic.close()
    print(f"\n{len(load.accepted)} orders accepted ({load.refused} refused while RabbitMQ restarted); "
          f"each stored once, {len(regular)} regular ones on orders-topic "
          f"({sum(on_topic[i] for i in regular) - len(regular)} duplicate record(s))")
