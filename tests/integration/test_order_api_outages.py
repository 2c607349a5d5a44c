"""The order API with a store down, on the real local platform: the broker down is a 503 to
retry and orders flow again once it is back; the cache down still accepts orders (the
processes and clients as in test_order_services)."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from tests.integration.test_order_services import (ORDER, QUEUES, Service, drain, orders, people,  # noqa: F401
                                                   rabbit, redis_admin, stock, topology)

pytestmark = pytest.mark.integration


# --- a store down ------------------------------------------------------------------------------


def stop_component(platform, name: str) -> None:
    from opsctl.components import build
    from tests.integration.conftest import workdir_context

    assert build(name, workdir_context(platform)).stop(), f"{name} was not running"


def restart_component(platform, name: str) -> None:
    code, steps = platform.steps("--only", name)
    assert code == 0, steps


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"not within {timeout:.0f}s: {what}")


def healthy(service: Service) -> bool:
    return httpx.get(f"{service.url}/health", timeout=5).status_code == 200


def test_broker_down_is_a_503_to_retry_and_orders_flow_again_when_it_is_back(
        topology, orders, people, redis_admin):
    key = f"outage-{uuid.uuid4()}"
    stop_component(topology, "rabbitmq")
    try:
        wait_for(lambda: not healthy(orders), 10, "/health reports the broker down")
        health = httpx.get(f"{orders.url}/health")
        assert health.status_code == 503 and health.json()["rabbitmq"] == "unreachable"
        started = time.monotonic()
        refused = httpx.post(f"{orders.url}/orders", json=ORDER, timeout=30,
                             headers={**people, "Idempotency-Key": key})
        assert refused.status_code == 503, refused.text
        assert "retry" in refused.json()["detail"] and refused.headers["Retry-After"]
        assert time.monotonic() - started < 12  # the publish timeout at most, never a hang
        assert redis_admin.get(f"idempotency:{key}") is None  # released: the retry may go on
    finally:
        restart_component(topology, "rabbitmq")
    wait_for(lambda: healthy(orders), 60, "the order-creator reconnected to the broker")
    connection = topology.amqp()
    try:
        channel = connection.channel()
        channel.queue_purge(QUEUES["priority"])
        # Every serving process must have reconnected: a burst reaches all of them.
        for _ in range(10):
            response = httpx.post(f"{orders.url}/orders", json=ORDER, timeout=30,
                                  headers={**people, "Idempotency-Key": key})
            assert response.status_code == 201, response.text
        burst = [httpx.post(f"{orders.url}/orders", json=ORDER, headers=people, timeout=30)
                 for _ in range(10)]
        assert [r.status_code for r in burst] == [201] * 10
        assert len(drain(channel, QUEUES["priority"])) == 11  # the retried key counted once
    finally:
        connection.close()


def test_cache_down_an_order_is_still_accepted_but_a_keyed_one_waits(topology, orders, people,
                                                                     rabbit):
    stop_component(topology, "redis")
    try:
        wait_for(lambda: not healthy(orders), 10, "/health reports Redis down")
        assert httpx.get(f"{orders.url}/health").json()["redis"] == "unreachable"
        accepted = httpx.post(f"{orders.url}/orders", json=ORDER, headers=people, timeout=30)
        assert accepted.status_code == 201, accepted.text  # the cache is only a cache
        keyed = httpx.post(f"{orders.url}/orders", json=ORDER, timeout=30,
                           headers={**people, "Idempotency-Key": f"k-{uuid.uuid4()}"})
        assert keyed.status_code == 503 and "Redis" in keyed.json()["detail"]
        [(_, _, body)] = drain(rabbit, QUEUES["priority"])
        assert json.loads(body)["order_id"] == accepted.json()["order_id"]
    finally:
        restart_component(topology, "redis")
    wait_for(lambda: healthy(orders), 30, "the order-creator sees Redis again")
    assert httpx.post(f"{orders.url}/orders", json=ORDER, timeout=30,
                      headers={**people, "Idempotency-Key": f"k-{uuid.uuid4()}"}).status_code == 201
    assert "not cached in Redis" in orders.tail(200)
