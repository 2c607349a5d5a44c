"""The whole order flow on the real servers, with the services started by opsctl:
API → RabbitMQ → consumers → PostgreSQL / MongoDB → CDC → Kafka."""

import json
import time
import uuid

import httpx
import pytest

from tests.integration.conftest import workdir_context

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


def wait_for(check, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def place(platform, kind: str) -> dict:
    order = {"customer": {"id": f"c-{uuid.uuid4().hex[:8]}", "name": "Test Client"},
             "items": [{"product": "Laptop", "category": "electronics", "quantity": 1, "price": 420.0}],
             "type": kind}
    port = workdir_context(platform).spec.services["order-creator"].port
    response = httpx.post(f"http://127.0.0.1:{port}/orders", json=order,
                          headers={"Authorization": f"Bearer {people_token(platform)}"}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def test_services_run_and_report_healthy(flow):
    status = flow.run("services", "status", "-o", "json", check_json=True)
    assert status.returncode == 0, status.json
    assert {s["component"] for s in status.json["services"]} == {
        "order-creator", "stock-service", "premium-consumer", "regular-consumer", "digital-consumer",
        "cdc-bridge"}
    code, steps = flow.steps("--only", "services")
    assert code == 0 and steps["services"]["state"] == "unchanged"


def test_each_order_type_reaches_its_store_and_regular_orders_reach_kafka(flow):
    import psycopg
    from confluent_kafka import Consumer
    from pymongo import MongoClient

    priority, regular, digital = (place(flow, kind) for kind in ("priority", "regular", "digital"))

    with psycopg.connect(host="127.0.0.1", port=flow.port("postgres", "postgres"), user="postgres",
                         password=flow.admin_secret("postgres", "password"), dbname="orders") as conn:
        row = wait_for(lambda: conn.execute(
            "SELECT document FROM priority_orders WHERE order_id = %s", [priority["order_id"]]).fetchone(),
            "the priority order in PostgreSQL")
    assert row[0]["total"] == priority["total"]

    with MongoClient(f"mongodb://127.0.0.1:{flow.port('mongodb', 'mongo')}/?replicaSet=rs0") as mongo:
        db = mongo.ecommerce
        assert wait_for(lambda: db.orders.find_one({"_id": regular["order_id"]}), "the regular order")
        assert wait_for(lambda: db.digital_orders.find_one({"_id": digital["order_id"]}), "the digital order")
        assert db.orders.count_documents({"_id": {"$in": [priority["order_id"], digital["order_id"]]}}) == 0

    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{flow.port('kafka', 'broker')}",
                         "group.id": f"test-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    consumer.subscribe(["orders-topic"])
    try:
        def seen():
            message = consumer.poll(1)
            return message is not None and not message.error() and \
                message.key() == regular["order_id"].encode() and message
        record = wait_for(seen, "the regular order on orders-topic", timeout=60)
        assert json.loads(record.value())["order_id"] == regular["order_id"]
    finally:
        consumer.close()


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

    health = wait_for(services_up, "Prometheus to scrape the services", timeout=60)
    assert health["rabbitmq"] == "up" and health["prometheus"] == "up"


def test_prometheus_has_the_order_queues_depth_and_rates(flow):
    from opsctl import httpclient

    base = f"http://127.0.0.1:{flow.port('prometheus-grafana', 'http')}/api/v1/query"

    def series(query: str):
        return httpclient.get(f"{base}?query={query}")["data"]["result"]

    depth = wait_for(lambda: series("rabbitmq_queue_messages_ready"), "queue depth in Prometheus", 60)
    assert {"priority-orders", "regular-orders", "digital-orders"} <= {s["metric"]["queue"] for s in depth}
    assert series("rabbitmq_queue_messages_published_total") or series("rabbitmq_global_messages_received_total")
