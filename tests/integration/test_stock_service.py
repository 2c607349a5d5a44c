"""The stock service as a real process on the real local platform: who may call it, its
catalogue, and reservations racing in PostgreSQL (the processes and clients as in
test_order_services)."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import free_ports, service_env
from tests.integration.test_order_services import (Service, pg_admin, people, quantity, roleless,  # noqa: F401 (fixtures)
                                                   run_to_exit, stock, test_product, token, topology)

pytestmark = pytest.mark.integration


# --- stock ------------------------------------------------------------------------------------


def test_catalogue_routes(topology, stock, people):
    categories = httpx.get(f"{stock.url}/stock/all-categories", headers=people).json()["categories"]
    assert {"electronics", "books", "clothing", "home", "sports", "toys", "beauty",
            "grocery"} <= set(categories)
    books = httpx.get(f"{stock.url}/stock/books", headers=people).json()
    assert books["category"] == "books"
    assert {p["product"]: p["price"] for p in books["products"]} == {
        "Novel": 15.0, "Cookbook": 25.0, "Biography": 20.0, "Atlas": 40.0, "Dictionary": 30.0}
    assert all(isinstance(p["quantity"], int) and p["quantity"] >= 0 for p in books["products"])
    unknown = httpx.get(f"{stock.url}/stock/no-such-category", headers=people)
    assert unknown.status_code == 404 and "no-such-category" in unknown.json()["detail"]
    everything = httpx.get(f"{stock.url}/stock/all-products-by-category", headers=people).json()
    assert sum(len(p) for c, p in everything.items() if not c.startswith("test-")) == 40
    assert set(everything["toys"][0]) == {"product", "price", "quantity"}


def test_who_may_call_the_stock_service(topology, stock, roleless):
    url = f"{stock.url}/stock/all-categories"
    assert httpx.get(url).status_code == 401
    # A valid token of the realm for the order API, without the role: not enough.
    refused = httpx.get(url, headers={"Authorization": f"Bearer {roleless}"})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error_description"] == "role create-orders-client-role required"
    assert httpx.get(url, headers={"Authorization": f"Bearer {token(topology)}"}).status_code == 200
    creator = {"Authorization": f"Bearer {token(topology, '--client', 'order-creator')}"}
    assert httpx.get(url, headers=creator).status_code == 200  # the catalogue's one caller
    consumer = {"Authorization": f"Bearer {token(topology, '--client', 'premium-consumer')}"}
    refused = httpx.get(url, headers=consumer)
    assert refused.status_code == 403 and "premium-consumer" in refused.json()["error_description"]


@pytest.mark.parametrize("what, body, status, named", [
    ("NUL in the order_id", b'{"order_id": "test-\\u0000", "items": [{"product": "Novel", '
                            b'"quantity": 1}]}', 422, "text_unstorable"),
    ("bidi override in the product", '{"order_id": "test-x", "items": [{"product": '
                                     '"Nov\u202eel", "quantity": 1}]}'.encode(), 422,
     "text_unstorable"),
    ("duplicate key", b'{"order_id": "test-x", "items": [{"product": "Novel", "quantity": 1, '
                      b'"quantity": 1000000}]}', 422, "json_duplicate_key"),
    ("oversized body", json.dumps({"order_id": "test-x", "items": [
        {"product": "n" * 90, "quantity": 1}] * 800}).encode(), 413, "64 KiB"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 60 else None)
def test_a_bad_reservation_body_is_refused_and_reserves_nothing(stock, people, pg_admin, what,
                                                               body, status, named):
    before = quantity(pg_admin, "Novel")
    response = httpx.post(f"{stock.url}/stock/reservations", content=body,
                          headers={**people, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert named in response.text
    assert quantity(pg_admin, "Novel") == before


def test_the_services_bound_what_one_client_holds(topology, stock):
    """Connections in flight (HTTP_LIMIT_CONCURRENCY) and idle ones (HTTP_KEEPALIVE_SECONDS),
    on a second stock service with small limits: a direct client cannot exhaust it."""
    port = free_ports(1)[0]
    env = {**service_env(topology, "stock-service"), "HTTP_PORT": str(port),
           "HTTP_LIMIT_CONCURRENCY": "3", "HTTP_KEEPALIVE_SECONDS": "2"}
    small = Service(topology, "stock-service-small", "order_services.stock_service", env).start()
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            full = httpx.get(f"{small.url}/health", timeout=5)
            assert full.status_code == 503, full.text  # over the limit: refused, not queued
            for s in idle:  # connections that send nothing are closed after the timeout
                s.settimeout(10)
                assert s.recv(1) == b""
        finally:
            for s in idle:
                s.close()
        assert httpx.get(f"{small.url}/health", timeout=5).status_code == 200
    finally:
        small.stop()
    bad = run_to_exit("order_services.stock_service", {**env, "HTTP_LIMIT_CONCURRENCY": "lots"})
    assert bad.returncode == 2 and "HTTP_LIMIT_CONCURRENCY" in bad.stdout + bad.stderr


def test_concurrent_reservations_never_oversell(stock, people, pg_admin, test_product):
    product, _ = test_product
    tag = product.split()[-1]

    def reserve(i: int) -> httpx.Response:
        return httpx.post(f"{stock.url}/stock/reservations", headers=people, timeout=30,
                          json={"order_id": f"test-{tag}-{i}", "items": [{"product": product,
                                                                           "quantity": 1}]})

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(reserve, range(20)))
    codes = [a.status_code for a in answers]
    assert codes.count(201) == 7 and codes.count(409) == 13, codes
    assert quantity(pg_admin, product) == 0
    short = next(a for a in answers if a.status_code == 409).json()
    assert short["short"] == [{"product": product, "requested": 1, "available": 0}]
    reserved = pg_admin.execute("SELECT count(*) FROM reservations WHERE order_id LIKE %s",
                                [f"test-{tag}-%"]).fetchone()[0]
    assert reserved == 7


def test_a_reservation_is_all_or_nothing(stock, people, pg_admin, test_product):
    product, _ = test_product
    tag = product.split()[-1]
    before = quantity(pg_admin, "Novel")
    response = httpx.post(f"{stock.url}/stock/reservations", headers=people, json={
        "order_id": f"test-{tag}-mixed", "items": [{"product": "Novel", "quantity": 1},
                                                   {"product": product, "quantity": 8}]})
    assert response.status_code == 409
    assert response.json()["short"] == [{"product": product, "requested": 8, "available": 7}]
    assert quantity(pg_admin, "Novel") == before and quantity(pg_admin, product) == 7
    unknown = httpx.post(f"{stock.url}/stock/reservations", headers=people, json={
        "order_id": f"test-{tag}-unknown", "items": [{"product": "Novel", "quantity": 1},
                                                     {"product": "No such thing", "quantity": 1}]})
    assert unknown.status_code == 404 and "No such thing" in unknown.text
    assert quantity(pg_admin, "Novel") == before
    bad = httpx.post(f"{stock.url}/stock/reservations", headers=people, json={
        "order_id": f"test-{tag}-bad", "items": [{"product": product, "quantity": 0}]})
    assert bad.status_code == 422 and "quantity" in bad.text


def test_a_repeated_order_id_reserves_once(stock, people, pg_admin, test_product):
    product, _ = test_product
    tag = product.split()[-1]
    body = {"order_id": f"test-{tag}-once", "items": [{"product": product, "quantity": 2}]}
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{stock.url}/stock/reservations",
                                                     headers=people, json=body, timeout=30),
                                range(5)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 200, 200, 201], codes
    assert len({a.json()["reservation_id"] for a in answers}) == 1
    assert quantity(pg_admin, product) == 5
    again = httpx.post(f"{stock.url}/stock/reservations", headers=people, json=body)
    assert again.status_code == 200 and again.json() == answers[0].json()
    assert quantity(pg_admin, product) == 5


def test_crossed_multi_item_reservations_do_not_deadlock(stock, people, pg_admin, test_product):
    product, _ = test_product
    tag = product.split()[-1]
    pg_admin.execute("UPDATE stock SET quantity = 100 WHERE product = %s", [product])
    before = quantity(pg_admin, "Dictionary")

    def reserve(i: int) -> httpx.Response:
        items = [{"product": product, "quantity": 1}, {"product": "Dictionary", "quantity": 1}]
        return httpx.post(f"{stock.url}/stock/reservations", headers=people, timeout=30,
                          json={"order_id": f"test-{tag}-x{i}", "items": items[::1 - 2 * (i % 2)]})

    with ThreadPoolExecutor(16) as pool:
        codes = [a.status_code for a in pool.map(reserve, range(32))]
    assert codes == [201] * 32
    assert quantity(pg_admin, product) == 68
    assert quantity(pg_admin, "Dictionary") == before - 32
    pg_admin.execute("UPDATE stock SET quantity = quantity + 32 WHERE product = 'Dictionary'")
