"""The order-creator and the stock service as real processes, on the real local platform:
the environment opsctl gives them, real Keycloak tokens, orders read back from RabbitMQ,
the cache read from Redis, reservations racing in PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import NAMES, service_env

pytestmark = pytest.mark.integration

QUEUES = {"priority": NAMES.queues.priority, "regular": NAMES.queues.regular, "digital": NAMES.queues.digital}
ORDER = {
    "customer": {"id": "c-1042", "name": "Ada Lovelace", "email": "ada@example.org"},
    "items": [{"product": "Laptop", "category": "electronics", "quantity": 1, "price": 420.0},
              {"product": "Atlas", "category": "books", "quantity": 2, "price": 40.0}],
    "type": "priority",
}


# --- the services as processes ------------------------------------------------------------


class Service:
    """`python -m order_services.<module>` with exactly the environment opsctl gives it."""

    def __init__(self, platform, name: str, module: str, env: dict[str, str] | None = None):
        self.name, self.module = name, module
        self.env = env if env is not None else service_env(platform, name)
        self.url = f"http://{self.env['HTTP_HOST']}:{self.env['HTTP_PORT']}"
        self.log = Path(platform.path) / f"test-{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Service:
        port = int(self.env["HTTP_PORT"])
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} of {self.name} is already taken: stop what listens there")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module], env=self.env, stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
            umask=0o077)  # as opsctl starts it: what it writes under .opsctl/ is private
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"{self.name} was not healthy after {timeout:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def run_to_exit(module: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def topology(platform):
    applied = platform.run("queues", "apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    return platform


@pytest.fixture(scope="module")
def stock(topology):
    service = Service(topology, "stock-service", "order_services.stock_service").start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def orders(topology, stock):
    # Started by hand, outside the mesh (no sidecar): wired to the stock service directly.
    env = {**service_env(topology, "order-creator"), "STOCK_URL": stock.url}
    service = Service(topology, "order-creator", "order_services.order_creator", env).start()
    yield service
    service.stop()
    assert service.process.returncode == 0, service.tail()


# --- clients --------------------------------------------------------------------------------


def token(platform, *args: str) -> str:
    result = platform.run("token", "-o", "json", *args, check_json=True)
    assert result.returncode == 0, result.stderr
    return result.json["access_token"]


@pytest.fixture(scope="module")
def people(topology) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(topology)}"}


@pytest.fixture(scope="module")
def roleless(topology):
    """A token for the order API (its audience) without the order role: from a client made
    for this test in the realm (the realm has none such), removed afterwards."""
    from keycloak import KeycloakAdmin

    keycloak = f"http://127.0.0.1:{topology.port('keycloak', 'http')}"
    admin = KeycloakAdmin(server_url=keycloak, username="opsctl-admin", realm_name="master",
                          password=topology.admin_secret("keycloak", "admin_password"),
                          user_realm_name="master")
    admin.change_current_realm(topology.names.realm)
    client_id, secret = f"test-no-role-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    uid = admin.create_client({"clientId": client_id, "secret": secret, "publicClient": False,
                               "serviceAccountsEnabled": True, "standardFlowEnabled": False,
                               "directAccessGrantsEnabled": False, "protocol": "openid-connect"})
    try:
        scope = admin.get_client_scope_by_name("create_orders_scope")["id"]
        admin.add_client_default_client_scope(uid, scope, {
            "realm": topology.names.realm, "client": uid, "clientScopeId": scope})
        answer = httpx.post(f"{keycloak}/realms/{topology.names.realm}/protocol/openid-connect/token",
                            data={"grant_type": "client_credentials", "client_id": client_id,
                                  "client_secret": secret})
        assert answer.status_code == 200, answer.text
        yield answer.json()["access_token"]
    finally:
        admin.delete_client(uid)


@pytest.fixture
def rabbit(topology):
    """A channel of the admin user, with the order queues purged (other tests use them too)."""
    connection = topology.amqp()
    channel = connection.channel()
    for queue in QUEUES.values():
        ok = channel.queue_declare(queue, passive=True)
        assert ok.method.consumer_count == 0, f"something consumes {queue}: these tests read it"
        channel.queue_purge(queue)
    yield channel
    connection.close()


def drain(channel, queue: str) -> list[tuple]:
    """Every message now in the queue, as (method, properties, body); acked."""
    messages = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return messages
        messages.append((method, properties, body))


def queue_depths(channel) -> dict[str, int]:
    return {t: channel.queue_declare(q, passive=True).method.message_count for t, q in QUEUES.items()}


@pytest.fixture(scope="module")
def redis_admin(topology):
    import redis

    client = redis.Redis(host="127.0.0.1", port=topology.port("redis", "redis"),
                         password=topology.admin_secret("redis", "password"), socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(scope="module")
def pg_admin(topology):
    import psycopg

    conn = psycopg.connect(host="127.0.0.1", port=topology.port("postgres", "postgres"),
                           dbname=NAMES.postgres.database, user="postgres",
                           password=topology.admin_secret("postgres", "password"), autocommit=True)
    yield conn
    conn.close()


@pytest.fixture
def test_product(pg_admin):
    """A product of its own (7 in stock) in a category of its own; removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    product, category = f"Test widget {tag}", f"test-{tag}"
    pg_admin.execute("INSERT INTO stock (product, category, price, quantity) VALUES (%s, %s, 9.5, 7)",
                     [product, category])
    yield product, category
    pg_admin.execute("DELETE FROM reservations WHERE order_id LIKE %s", [f"test-{tag}-%"])
    pg_admin.execute("DELETE FROM stock WHERE category = %s", [category])


def quantity(pg_admin, product: str) -> int:
    return pg_admin.execute("SELECT quantity FROM stock WHERE product = %s", [product]).fetchone()[0]


# --- open routes ----------------------------------------------------------------------------


def test_health_and_metrics_are_open(stock, orders):
    for service in (stock, orders):
        assert httpx.get(f"{service.url}/health").json() == {"status": "ok"}
        metrics = httpx.get(f"{service.url}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
    assert "orders_accepted_total" in httpx.get(f"{orders.url}/metrics").text
    assert "stock_reservations_total" in httpx.get(f"{stock.url}/metrics").text


def test_every_other_route_needs_a_token_with_the_role(topology, orders, rabbit):
    for method, path in (("POST", "/orders"), ("POST", "/create"), ("GET", "/order/x"),
                         ("GET", "/all-products-by-category")):
        response = httpx.request(method, f"{orders.url}{path}", json=ORDER)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # A service's own token is a valid token of the realm, but not for the order API: its
    # only audience is Vault's, which the validator checks before the role.
    service = {"Authorization": f"Bearer {token(topology, '--client', 'stock-service')}"}
    response = httpx.post(f"{orders.url}/orders", json=ORDER, headers=service)
    assert response.status_code == 401
    assert response.json()["error_description"] == "wrong audience"
    forged = {"Authorization": "Bearer " + token(topology)[:-4] + "AAAA"}
    assert httpx.post(f"{orders.url}/orders", json=ORDER, headers=forged).status_code == 401
    assert queue_depths(rabbit) == {"priority": 0, "regular": 0, "digital": 0}


def test_a_token_for_the_order_api_without_the_role_is_a_403(orders, roleless, rabbit):
    headers = {"Authorization": f"Bearer {roleless}"}
    response = httpx.post(f"{orders.url}/orders", json=ORDER, headers=headers)
    assert response.status_code == 403
    assert response.json() == {"error": "insufficient_scope",
                               "error_description": "role create-orders-client-role required"}
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert httpx.get(f"{orders.url}/all-products-by-category", headers=headers).status_code == 403
    assert queue_depths(rabbit) == {"priority": 0, "regular": 0, "digital": 0}


# --- orders -----------------------------------------------------------------------------------


def test_each_type_answers_201_and_lands_in_its_queue(orders, people, rabbit, redis_admin):
    placed = {}
    for kind in ("priority", "regular", "digital"):
        response = httpx.post(f"{orders.url}/orders", json={**ORDER, "type": kind}, headers=people)
        assert response.status_code == 201, response.text
        placed[kind] = response.json()
    for kind, document in placed.items():
        assert uuid.UUID(document["order_id"]).version == 4
        assert document["type"] == kind and document["total"] == 500.0
        assert document["customer"] == ORDER["customer"] and document["items"] == ORDER["items"]
        [(method, properties, body)] = drain(rabbit, QUEUES[kind])
        assert json.loads(body) == document
        assert method.exchange == NAMES.exchanges.orders and method.routing_key == kind
        assert properties.delivery_mode == 2  # persistent
        assert properties.content_type == "application/json"
        assert properties.message_id == document["order_id"]
        if kind == "priority":
            assert 1 <= properties.priority <= 10
            assert properties.priority == 6  # a 500.00 order
        else:
            assert not properties.priority  # aio-pika's default 0: meaningless off the priority queue
        # The cache has it, and GET /order reads it back.
        cached = redis_admin.get(f"order:{document['order_id']}")
        assert json.loads(cached) == document
        assert redis_admin.ttl(f"order:{document['order_id']}") > 86400
        again = httpx.get(f"{orders.url}/order/{document['order_id']}", headers=people)
        assert again.status_code == 200 and again.json() == document
    assert httpx.get(f"{orders.url}/order/{uuid.uuid4()}", headers=people).status_code == 404


def test_a_retry_with_the_same_idempotency_key_publishes_nothing_more(orders, people, rabbit,
                                                                      redis_admin):
    key = f"retry-{uuid.uuid4()}"
    headers = {**people, "Idempotency-Key": key}
    first = httpx.post(f"{orders.url}/orders", json=ORDER, headers=headers)
    assert first.status_code == 201, first.text
    for _ in range(3):
        again = httpx.post(f"{orders.url}/orders", json=ORDER, headers=headers)
        assert again.status_code == 201
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
    assert len(drain(rabbit, QUEUES["priority"])) == 1
    assert redis_admin.get(f"idempotency:{key}").decode() == first.json()["order_id"]
    assert 0 < redis_admin.ttl(f"idempotency:{key}") <= 86400
    # The same key for another order: refused, nothing published.
    other = httpx.post(f"{orders.url}/orders", json={**ORDER, "type": "regular"}, headers=headers)
    assert other.status_code == 422
    assert queue_depths(rabbit) == {"priority": 0, "regular": 0, "digital": 0}


def test_concurrent_requests_with_one_key_make_one_order(orders, people, rabbit):
    headers = {**people, "Idempotency-Key": f"burst-{uuid.uuid4()}"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{orders.url}/orders", json=ORDER,
                                                     headers=headers, timeout=10), range(8)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {201, 409} and codes.count(201) >= 1, codes
    assert len({a.json()["order_id"] for a in answers if a.status_code == 201}) == 1
    assert len(drain(rabbit, QUEUES["priority"])) == 1


def _with(path: str, value) -> dict:
    order = json.loads(json.dumps(ORDER))
    *parents, last = path.split(".")
    target = order
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[int(last) if last.isdigit() else last] = value
    return order


BAD = [
    ("malformed JSON", b'{"customer": {"id": "c-1", ', 422, "malformed JSON"),
    ("not JSON at all", b"<order/>", 422, "malformed JSON"),
    ("wrong type: quantity as text", _with("items.0.quantity", "2"), 422, "quantity"),
    ("wrong type: customer as a list", _with("customer", ["c-1"]), 422, "customer"),
    ("negative quantity", _with("items.0.quantity", -1), 422, "quantity"),
    ("zero price", _with("items.1.price", 0), 422, "price"),
    ("unknown type", _with("type", "express"), 422, "type"),
    ("no items", _with("items", []), 422, "items"),
    ("unknown field", {**ORDER, "discount": 10}, 422, "discount"),
    ("oversized body", _with("customer.name", "n" * 70_000), 413, "64 KiB"),
    ("NUL in the name (jsonb refuses it)", _with("customer.name", "Ada\u0000Lovelace"), 422,
     "text_unstorable"),
    ("bidi override in the product", _with("items.0.product", "Lap\u202etop"), 422,
     "text_unstorable"),
    ("an id of zero-width spaces", _with("customer.id", "\u200b\u200b"), 422, "text_unstorable"),
    ("an id of Hangul fillers", _with("customer.id", "\u3164"), 422, "text_invisible"),
    ("a price of 1e-300 (a total of 0.00)", _with("items.1.price", 1e-300), 422, "price"),
    ("a price with three decimals", _with("items.1.price", 40.001), 422, "price_precision"),
    ("duplicate key: type twice", json.dumps(ORDER)[:-1].encode() + b', "type": "regular"}', 422,
     "json_duplicate_key"),
    ("duplicate key inside customer",
     json.dumps(ORDER).replace('"id": "c-1042"', '"id": "c-1042", "id": "c-1"').encode(), 422,
     "json_duplicate_key"),
]


@pytest.mark.parametrize("what, body, status, named", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx_and_publishes_nothing(orders, people, rabbit, what, body, status,
                                                        named):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{orders.url}/orders", content=content,
                          headers={**people, "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert named in response.text
    assert queue_depths(rabbit) == {"priority": 0, "regular": 0, "digital": 0}


def test_two_idempotency_key_headers_are_a_400(orders, people, rabbit):
    response = httpx.post(f"{orders.url}/orders", content=json.dumps(ORDER).encode(), headers=[
        *people.items(), ("Content-Type", "application/json"),
        ("Idempotency-Key", f"a-{uuid.uuid4()}"), ("Idempotency-Key", f"b-{uuid.uuid4()}")])
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()["detail"]
    assert queue_depths(rabbit) == {"priority": 0, "regular": 0, "digital": 0}


def rabbitmqctl(platform, *args: str) -> None:
    from opsctl.components import build
    from opsctl.components.rabbitmq import SCRIPTS
    from tests.integration.conftest import workdir_context

    server = build("rabbitmq", workdir_context(platform))
    result = subprocess.run([str(SCRIPTS / "rabbitmqctl"), *args], env={**os.environ, **server.env()},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unconfirmed_order_keeps_its_key_and_the_retry_sends_the_same_order(
        topology, orders, people, rabbit, redis_admin):
    """The broker blocks publishers (a memory alarm): the confirm times out, the broker may
    take the order later all the same. The key stays bound to that order_id, and the retry
    publishes the same order (same order_id): never a second order."""
    key = f"blocked-{uuid.uuid4()}"
    headers = {**people, "Idempotency-Key": key}
    rabbitmqctl(topology, "set_vm_memory_high_watermark", "0")
    try:
        started = time.monotonic()
        first = httpx.post(f"{orders.url}/orders", json=ORDER, headers=headers, timeout=60)
        assert first.status_code == 503, first.text
        assert time.monotonic() - started < 20
        order_id = first.json()["order_id"]
        assert "same Idempotency-Key" in first.json()["detail"]
        assert redis_admin.get(f"idempotency:{key}").decode() == order_id  # still bound
    finally:
        rabbitmqctl(topology, "set_vm_memory_high_watermark", "0.4")
    retry = None
    for _ in range(20):  # until the broker reads again
        retry = httpx.post(f"{orders.url}/orders", json=ORDER, headers=headers, timeout=60)
        if retry.status_code == 201:
            break
        assert retry.status_code == 503 and retry.json()["order_id"] == order_id, retry.text
        time.sleep(1)
    assert retry.status_code == 201, retry.text
    assert retry.json()["order_id"] == order_id
    time.sleep(1)  # the blocked first copy, if the broker took it, is in the queue by now
    messages = drain(rabbit, QUEUES["priority"])
    assert 1 <= len(messages) <= 2  # maybe twice, always one order (consumers store it once)
    assert {json.loads(body)["order_id"] for _, _, body in messages} == {order_id}
    again = httpx.post(f"{orders.url}/orders", json=ORDER, headers=headers, timeout=30)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["order_id"] == order_id
    assert queue_depths(rabbit) == {"priority": 0, "regular": 0, "digital": 0}


def test_create_publishes_random_orders_from_the_catalogue(orders, stock, people, rabbit):
    catalogue = httpx.get(f"{stock.url}/stock/all-products-by-category", headers=people).json()
    prices = {p["product"]: (c, p["price"]) for c, ps in catalogue.items() for p in ps}
    served = httpx.get(f"{orders.url}/all-products-by-category", headers=people)
    assert served.status_code == 200
    assert {p["product"] for ps in served.json().values() for p in ps} == set(prices)

    response = httpx.post(f"{orders.url}/create", json={"number_of_orders": 12}, headers=people,
                          timeout=30)
    assert response.status_code == 201, response.text
    created = response.json()["orders"]
    assert len(created) == 12
    for order in created:
        assert 1 <= len(order["items"]) <= 3
        for item in order["items"]:
            assert (item["category"], item["price"]) == prices[item["product"]]
            assert 10 <= item["price"] <= 500
    landed = {kind: {json.loads(body)["order_id"] for _, _, body in drain(rabbit, queue)}
              for kind, queue in QUEUES.items()}
    for kind in QUEUES:
        assert landed[kind] == {o["order_id"] for o in created if o["type"] == kind}
    assert httpx.post(f"{orders.url}/create", json={"number_of_orders": 0},
                      headers=people).status_code == 422


def test_accepted_orders_are_counted_by_type(orders, people, rabbit):
    def accepted(kind: str) -> float:
        for line in httpx.get(f"{orders.url}/metrics").text.splitlines():
            if line.startswith(f'orders_accepted_total{{type="{kind}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = accepted("digital")
    for _ in range(3):
        assert httpx.post(f"{orders.url}/orders", json={**ORDER, "type": "digital"},
                          headers=people).status_code == 201
    assert accepted("digital") == before + 3  # added up over every serving process
    assert "order_request_seconds_bucket" in httpx.get(f"{orders.url}/metrics").text


# --- start-up ------------------------------------------------------------------------------


def test_a_missing_setting_or_an_unreachable_store_stops_the_start(topology):
    env = service_env(topology, "order-creator")
    result = run_to_exit("order_services.order_creator",
                         {k: v for k, v in env.items() if k != "ORDER_EXCHANGE"})
    assert result.returncode != 0 and "ORDER_EXCHANGE" in result.stdout + result.stderr
    result = run_to_exit("order_services.order_creator",
                         {**env, "ORDER_EXCHANGE": "no-such-exchange"})
    assert result.returncode != 0
    assert "no-such-exchange" in result.stdout and "opsctl queues apply" in result.stdout

    env = service_env(topology, "stock-service")
    result = run_to_exit("order_services.stock_service",
                         {k: v for k, v in env.items() if k != "POSTGRES_HOST"})
    assert result.returncode != 0 and "POSTGRES_HOST" in result.stdout + result.stderr
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = run_to_exit("order_services.stock_service",
                         {**env, "POSTGRES_PORT": str(port)})
    assert result.returncode != 0
    assert f"PostgreSQL at 127.0.0.1:{port}" in result.stdout
