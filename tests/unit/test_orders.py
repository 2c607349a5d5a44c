"""The order generator and the load generator (against a local HTTP stand-in for the API)."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from opsctl import spec
from opsctl.orders import ANOMALY_KINDS, OrderGenerator, run_load

CATALOGUE = yaml.safe_load(spec.DEFAULT_SPEC.read_text())["catalogue"]["products"]
PRICES = {p: price for items in CATALOGUE.values() for p, price in items.items()}
CATEGORY = {p: c for c, items in CATALOGUE.items() for p in items}


def test_same_seed_same_orders():
    g1, g2 = OrderGenerator(CATALOGUE, 0.2, seed=7), OrderGenerator(CATALOGUE, 0.2, seed=7)
    assert [g1.next() for _ in range(200)] == [g2.next() for _ in range(200)]


def test_normal_orders_follow_the_catalogue():
    gen = OrderGenerator(CATALOGUE, 0.0, seed=1)
    for _ in range(300):
        order, kind = gen.next()
        assert kind == "normal" and order["type"] in ("priority", "regular", "digital")
        for item in order["items"]:
            assert item["price"] == PRICES[item["product"]]
            assert item["category"] == CATEGORY[item["product"]]
            assert 1 <= item["quantity"] <= 5


def test_each_anomaly_kind_is_what_its_label_says():
    gen = OrderGenerator(CATALOGUE, 1.0, seed=3)
    seen = {}
    for _ in range(2000):
        order, kind = gen.next()
        seen.setdefault(kind, []).append(order)
    assert set(seen) == set(ANOMALY_KINDS)
    assert all(o["items"][0]["price"] >= 10 * PRICES[o["items"][0]["product"]] for o in seen["price_outlier"])
    assert all(o["items"][0]["quantity"] >= 200 for o in seen["quantity_spike"])
    assert all(o["items"][0]["category"] != CATEGORY[o["items"][0]["product"]]
               for o in seen["category_mismatch"])
    burst_customers = [o["customer"]["id"] for o in seen["customer_burst"]]
    assert max(burst_customers.count(c) for c in set(burst_customers)) >= 10


@pytest.fixture
def api():
    """An HTTP stand-in for the order API: 201 for a bearer token, 422 for 'reject me'."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.headers.get("Authorization"), body))
            status = 422 if body["customer"]["id"] == "c-00000" else 201
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # the default 5 drops connections when a busy machine lags

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/orders", seen
    server.shutdown()


def test_load_sends_the_planned_orders_with_the_token_and_counts_answers(api):
    url, seen = api
    gen = OrderGenerator(CATALOGUE, 0.0, seed=5, customers=3)
    result = asyncio.run(run_load(url, lambda: "tok", gen, rate=200, duration=0.5))
    assert result.sent == result.planned == 100 == len(seen)
    assert all(auth == "Bearer tok" for auth, _ in seen)
    rejected = sum(1 for _, body in seen if body["customer"]["id"] == "c-00000")
    assert result.rejected.get(422, 0) == rejected and result.accepted == 100 - rejected
    summary = result.summary()
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"] <= summary["latency_ms"]["max"]
    assert result.elapsed >= 0.45  # paced by the schedule: 100 orders at 200/s take 0.5 s


def test_unreachable_api_counts_errors_not_crashes():
    gen = OrderGenerator(CATALOGUE, 0.0, seed=5)
    result = asyncio.run(run_load("http://127.0.0.1:9/orders", lambda: "t", gen, rate=50, duration=0.1))
    assert result.accepted == 0 and sum(result.errors.values()) == result.sent == 5
