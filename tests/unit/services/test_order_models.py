"""The order API's validation, seen from a client: every bad body gets its 4xx with the
field named, and nothing is published. The FastAPI app is the real one; the broker, Redis
and the token check are in-memory fakes (what these tests do not test)."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import datetime, timezone

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from order_services import order_api
from order_services.auth import AuthError
from order_services.bodies import MAX_BODY_BYTES
from order_services.catalogue import Catalogue
from order_services.order_api import OrderService, create_app
from order_services.order_model import amqp_priority
from order_services.publisher import PublishFailed

GOOD = "Bearer good-token"
ORDER = {
    "customer": {"id": "c-1042", "name": "Ada Lovelace", "email": "ada@example.org"},
    "items": [{"product": "Laptop", "category": "electronics", "quantity": 1, "price": 420.0},
              {"product": "Atlas", "category": "books", "quantity": 3, "price": 39.99}],
    "type": "priority",
}


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[dict] = []
        self.fail: str | None = None

    def healthy(self) -> bool:
        return True

    async def publish(self, document: dict, body: bytes) -> None:
        assert json.loads(body) == document
        if self.fail:
            # As AmqpPublisher: a timeout or a lost connection leaves the outcome uncertain.
            raise PublishFailed(self.fail, certain="confirm" not in self.fail
                                and "lost" not in self.fail)
        self.published.append(document)


class FakeRedis:
    """The four commands of redis.asyncio the service uses, in memory (TTL recorded, not run)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttl: dict[str, int] = {}

    async def set(self, name, value, nx=False, ex=None):
        if nx and name in self.data:
            return None
        self.data[name] = value.encode() if isinstance(value, str) else value
        self.ttl[name] = ex
        return True

    async def get(self, name):
        return self.data.get(name)

    async def delete(self, name):
        return int(self.data.pop(name, None) is not None)

    async def ping(self):
        return True


async def fake_authenticate(request: Request) -> dict:
    header = request.headers.get("authorization")
    if header is None:
        raise AuthError(401, "invalid_request", "missing bearer token", "test")
    if header == "Bearer wrong-role":
        raise AuthError(403, "insufficient_scope", "role create-orders-client-role required", "test")
    if header != GOOD:
        raise AuthError(401, "invalid_token", "bad signature", "test")
    return {"sub": "tester"}


@pytest.fixture
def api():
    publisher, redis = FakePublisher(), FakeRedis()
    catalogue = Catalogue("http://stock.invalid", None)
    catalogue.products = {
        "electronics": [{"product": "Laptop", "price": 420.0, "quantity": 10},
                        {"product": "Monitor", "price": 230.0, "quantity": 10}],
        "books": [{"product": "Atlas", "price": 40.0, "quantity": 10}],
    }
    app = create_app(OrderService(publisher, redis, catalogue), fake_authenticate)
    client = TestClient(app, headers={"Authorization": GOOD})
    client.publisher, client.redis = publisher, redis
    return client


def post(api, body, **headers):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return api.post("/orders", content=content,
                    headers={"Content-Type": "application/json", **headers})


def with_change(path: str, value) -> dict:
    """ORDER with the field at dotted `path` set to value (or removed, for value=DELETE)."""
    order = copy.deepcopy(ORDER)
    *parents, last = path.split(".")
    target = order
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is DELETE:
        del target[int(last) if last.isdigit() else last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return order


DELETE = object()
ITEM = ORDER["items"][0]

# (what is wrong, the body, the field FastAPI's 422 must name, the error type)
BAD_BODIES = [
    ("customer missing", with_change("customer", DELETE), ["body", "customer"], "missing"),
    ("customer not an object", with_change("customer", "Ada"), ["body", "customer"], "model_type"),
    ("customer id missing", with_change("customer.id", DELETE), ["body", "customer", "id"], "missing"),
    ("customer id empty", with_change("customer.id", ""), ["body", "customer", "id"], "string_too_short"),
    ("customer id too long", with_change("customer.id", "c" * 65), ["body", "customer", "id"],
     "string_too_long"),
    ("customer id a number", with_change("customer.id", 1042), ["body", "customer", "id"], "string_type"),
    ("customer name blank", with_change("customer.name", "   "), ["body", "customer", "name"],
     "string_pattern_mismatch"),
    ("customer name too long", with_change("customer.name", "n" * 201), ["body", "customer", "name"],
     "string_too_long"),
    ("email without @", with_change("customer.email", "ada.example.org"),
     ["body", "customer", "email"], "string_pattern_mismatch"),
    ("email without domain dot", with_change("customer.email", "ada@localhost"),
     ["body", "customer", "email"], "string_pattern_mismatch"),
    ("customer extra field", with_change("customer.vip", True), ["body", "customer", "vip"],
     "extra_forbidden"),
    ("items missing", with_change("items", DELETE), ["body", "items"], "missing"),
    ("items empty", with_change("items", []), ["body", "items"], "too_short"),
    ("items over 100", with_change("items", [ITEM] * 101), ["body", "items"], "too_long"),
    ("items not a list", with_change("items", ITEM), ["body", "items"], "list_type"),
    ("quantity zero", with_change("items.0.quantity", 0), ["body", "items", 0, "quantity"],
     "greater_than_equal"),
    ("quantity negative", with_change("items.0.quantity", -2), ["body", "items", 0, "quantity"],
     "greater_than_equal"),
    ("quantity over 1000", with_change("items.0.quantity", 1001), ["body", "items", 0, "quantity"],
     "less_than_equal"),
    ("quantity a string", with_change("items.0.quantity", "1"), ["body", "items", 0, "quantity"],
     "int_type"),
    ("quantity a fraction", with_change("items.0.quantity", 1.5), ["body", "items", 0, "quantity"],
     "int_type"),
    ("quantity a boolean", with_change("items.0.quantity", True), ["body", "items", 0, "quantity"],
     "int_type"),
    ("price zero", with_change("items.1.price", 0), ["body", "items", 1, "price"],
     "greater_than_equal"),
    ("price negative", with_change("items.1.price", -5.0), ["body", "items", 1, "price"],
     "greater_than_equal"),
    ("price 1e-300 (a total of 0.00)", with_change("items.1.price", 1e-300),
     ["body", "items", 1, "price"], "greater_than_equal"),
    ("price under a cent", with_change("items.1.price", 0.009), ["body", "items", 1, "price"],
     "greater_than_equal"),
    ("price with three decimals", with_change("items.1.price", 39.995),
     ["body", "items", 1, "price"], "price_precision"),
    ("price a float artefact", with_change("items.1.price", 0.1 + 0.2),
     ["body", "items", 1, "price"], "price_precision"),
    ("price over 100000", with_change("items.1.price", 100000.01), ["body", "items", 1, "price"],
     "less_than_equal"),
    ("price a string", with_change("items.1.price", "39.99"), ["body", "items", 1, "price"],
     "float_type"),
    ("price missing", with_change("items.1.price", DELETE), ["body", "items", 1, "price"], "missing"),
    ("product empty", with_change("items.0.product", ""), ["body", "items", 0, "product"],
     "string_too_short"),
    ("product too long", with_change("items.0.product", "p" * 101), ["body", "items", 0, "product"],
     "string_too_long"),
    ("category too long", with_change("items.0.category", "c" * 51), ["body", "items", 0, "category"],
     "string_too_long"),
    ("category missing", with_change("items.0.category", DELETE), ["body", "items", 0, "category"],
     "missing"),
    ("item extra field", with_change("items.0.discount", 5), ["body", "items", 0, "discount"],
     "extra_forbidden"),
    ("NUL in the name", with_change("customer.name", "Ada\u0000Lovelace"),
     ["body", "customer", "name"], "text_unstorable"),
    ("escape character in the id", with_change("customer.id", "c-\u001b[31m1"),
     ["body", "customer", "id"], "text_unstorable"),
    ("DEL in the product", with_change("items.0.product", "Lap\u007ftop"),
     ["body", "items", 0, "product"], "text_unstorable"),
    ("newline in the category", with_change("items.0.category", "home\nware"),
     ["body", "items", 0, "category"], "text_unstorable"),
    ("bidi override in the name", with_change("customer.name", "Ada \u202eecalevoL"),
     ["body", "customer", "name"], "text_unstorable"),
    ("zero-width space in the product", with_change("items.1.product", "At\u200blas"),
     ["body", "items", 1, "product"], "text_unstorable"),
    ("zero-width joiner in the email", with_change("customer.email", "ada\u200d@example.org"),
     ["body", "customer", "email"], "text_unstorable"),
    ("byte order mark in the id", with_change("customer.id", "\ufeffc-1042"),
     ["body", "customer", "id"], "text_unstorable"),
    ("name only of ideographic spaces", with_change("customer.name", "\u3000\u3000"),
     ["body", "customer", "name"], "string_pattern_mismatch"),
    ("id only of Hangul fillers", with_change("customer.id", "\u3164\u3164"),
     ["body", "customer", "id"], "text_invisible"),
    ("name only of combining marks", with_change("customer.name", "\u0301\u0308"),
     ["body", "customer", "name"], "text_invisible"),
    ("product only of blank braille", with_change("items.0.product", "\u2800"),
     ["body", "items", 0, "product"], "text_invisible"),
    ("type unknown", with_change("type", "express"), ["body", "type"], "literal_error"),
    ("type in capitals", with_change("type", "PRIORITY"), ["body", "type"], "literal_error"),
    ("type missing", with_change("type", DELETE), ["body", "type"], "missing"),
    ("extra top-level field", with_change("total", 1.0), ["body", "total"], "extra_forbidden"),
    ("a list, not an object", [ORDER], ["body"], "model_type"),
]


@pytest.mark.parametrize("what, body, loc, kind", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_each_bad_body_is_a_422_naming_the_field_and_publishes_nothing(api, what, body, loc, kind):
    response = post(api, body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [loc, kind] in [[e["loc"], e["type"]] for e in errors], errors
    assert all(e["msg"] for e in errors)
    assert api.publisher.published == []
    assert api.redis.data == {}


@pytest.mark.parametrize("raw", [b'{"customer": {"id": "c-1"', b"", b"not json", b'{"items": [1,]}',
                                 b"\xff\xfe"],
                         ids=["truncated", "empty", "text", "trailing comma", "not utf-8"])
def test_malformed_json_is_a_422_that_says_so(api, raw):
    response = post(api, raw)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["type"] == "json_invalid" and error["loc"] == ["body"]
    assert error["msg"].startswith("malformed JSON")
    assert api.publisher.published == []


def test_a_lone_surrogate_is_refused_as_malformed_json(api):
    response = post(api, json.dumps(with_change("customer.name", "Ada\ud800")))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["type"] == "json_invalid"
    assert api.publisher.published == []


@pytest.mark.parametrize("raw, loc", [
    (b'{"customer": {"id": "c-1", "name": "Ada"}, "items": [{"product": "Lamp", "category": '
     b'"home", "quantity": 1, "price": 35.0}], "type": "regular", "type": "priority"}', ["body", "type"]),
    (b'{"customer": {"id": "c-1", "name": "Ada", "id": "c-2"}, "items": [{"product": "Lamp", '
     b'"category": "home", "quantity": 1, "price": 35.0}], "type": "regular"}', ["body", "customer", "id"]),
    (b'{"customer": {"id": "c-1", "name": "Ada"}, "items": [{"product": "Lamp", "category": '
     b'"home", "quantity": 1, "price": 35.0}, {"product": "Tea", "category": "grocery", '
     b'"quantity": 1, "price": 10.0, "price": 0.01}], "type": "regular"}', ["body", "items", 1, "price"]),
], ids=["top level", "inside customer", "inside the second item"])
def test_a_duplicate_json_key_is_a_422_naming_it(api, raw, loc):
    response = post(api, raw)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["type"] == "json_duplicate_key" and error["loc"] == loc
    assert repr(loc[-1]) in error["msg"]
    assert api.publisher.published == []


def test_a_duplicate_key_in_create_is_refused_too(api):
    response = api.post("/create", content=b'{"number_of_orders": 1, "number_of_orders": 1000}',
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "number_of_orders"]
    assert api.publisher.published == []


def test_odd_prices_and_categories_stay_acceptable_for_the_screening(api):
    odd = with_change("items.0.category", "weapons")
    odd["items"][0]["price"] = 0.01
    odd["items"][1]["price"] = 99999.99
    response = post(api, odd)
    assert response.status_code == 201, response.text
    assert response.json()["total"] == round(0.01 + 3 * 99999.99, 2)
    # Text that is merely unusual is fine: accents, scripts, emoji, a non-breaking space.
    fine = with_change("customer.name", "Zoë\u00a0Ōkubo 李 🙂")
    assert post(api, fine).status_code == 201


def test_two_idempotency_key_headers_are_a_400(api):
    response = api.post("/orders", content=json.dumps(ORDER),
                        headers=[("Content-Type", "application/json"),
                                 ("Idempotency-Key", "order-1"), ("Idempotency-Key", "order-2")])
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()["detail"]
    assert api.publisher.published == [] and api.redis.data == {}


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_by_name_never_a_500(api, number):
    raw = json.dumps(ORDER).replace("39.99", number).encode()
    response = post(api, raw)
    assert response.status_code == 422, response.text
    assert ["body", "items", 1, "price"] in [e["loc"] for e in response.json()["detail"]]
    response = post(api, json.dumps(ORDER).replace('"Ada Lovelace"', number).encode())
    assert response.status_code == 422, response.text  # the echoed input stays valid JSON
    assert ["body", "customer", "name"] in [e["loc"] for e in response.json()["detail"]]
    assert api.publisher.published == []


def test_a_body_over_64_kib_is_a_413_before_anything_reads_it(api):
    big = with_change("customer.name", "n" * (MAX_BODY_BYTES + 1))
    response = post(api, big)
    assert response.status_code == 413
    assert "64 KiB" in response.json()["detail"]
    assert api.publisher.published == []


def test_a_chunked_body_over_64_kib_is_a_413_too(api):
    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b'{"customer": {"id": "c-1", "name": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"n" * 1024
        yield b'"}}'

    response = api.post("/orders", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert api.publisher.published == []


def test_a_body_of_exactly_the_limit_is_parsed(api):
    body = json.dumps(ORDER)
    body = body[:-1] + " " * (MAX_BODY_BYTES - len(body)) + "}"
    assert len(body) == MAX_BODY_BYTES
    assert post(api, body).status_code == 201


def test_a_body_that_is_not_json_is_a_415(api):
    response = api.post("/orders", content="customer=Ada",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]
    assert api.publisher.published == []


def test_no_token_is_a_401_before_the_body_is_even_read(api):
    del api.headers["Authorization"]
    for body in (ORDER, b"{broken"):
        response = post(api, body)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert post(api, ORDER, Authorization="Bearer wrong-role").status_code == 403
    assert post(api, ORDER, Authorization="Bearer forged").status_code == 401
    assert api.publisher.published == []


@pytest.mark.parametrize("key", ["", "k" * 201, "has space", "tab\tkey"])
def test_a_bad_idempotency_key_is_a_422_naming_the_header(api, key):
    response = post(api, ORDER, **{"Idempotency-Key": key})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    assert api.publisher.published == []


def test_a_good_order_is_published_once_and_answered_with_the_document(api):
    response = post(api, ORDER)
    assert response.status_code == 201, response.text
    document = response.json()
    assert api.publisher.published == [document]
    assert uuid.UUID(document["order_id"]).version == 4
    assert document["type"] == "priority"
    assert document["customer"] == ORDER["customer"]
    assert document["items"] == ORDER["items"]
    assert document["total"] == 539.97  # 420 + 3 × 39.99, 2 decimals
    created = datetime.fromisoformat(document["created_at"])
    assert created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 5
    assert response.headers["Location"] == f"/order/{document['order_id']}"
    assert json.loads(api.redis.data[f"order:{document['order_id']}"]) == document
    assert api.get(f"/order/{document['order_id']}").json() == document


def test_the_limits_themselves_are_accepted(api):
    order = {"customer": {"id": "c" * 64, "name": "n" * 200},  # email is optional
             "items": [{"product": "p" * 100, "category": "c" * 50, "quantity": 1000,
                        "price": 100000}] * 100,
             "type": "digital"}
    response = post(api, order)
    assert response.status_code == 201, response.text
    document = response.json()
    assert "email" not in document["customer"]
    assert document["items"][0]["price"] == 100000.0  # an integer price is a price
    assert document["total"] == 100 * 1000 * 100000.0


@pytest.mark.parametrize("body, loc", [
    ({"number_of_orders": 0}, ["body", "number_of_orders"]),
    ({"number_of_orders": 1001}, ["body", "number_of_orders"]),
    ({"number_of_orders": "3"}, ["body", "number_of_orders"]),
    ({}, ["body", "number_of_orders"]),
    ({"number_of_orders": 3, "type": "priority"}, ["body", "type"]),
])
def test_create_validates_its_body(api, body, loc):
    response = api.post("/create", json=body)
    assert response.status_code == 422
    assert loc in [e["loc"] for e in response.json()["detail"]]
    assert api.publisher.published == []


def test_create_publishes_random_orders_from_the_catalogue(api):
    response = api.post("/create", json={"number_of_orders": 25})
    assert response.status_code == 201, response.text
    orders = response.json()["orders"]
    assert len(orders) == 25 and api.publisher.published == orders
    prices = {"Laptop": ("electronics", 420.0), "Monitor": ("electronics", 230.0),
              "Atlas": ("books", 40.0)}  # the fixture's catalogue
    for order in orders:
        assert order["type"] in ("priority", "regular", "digital")
        assert 1 <= len(order["items"]) <= 3
        for item in order["items"]:
            assert (item["category"], item["price"]) == prices[item["product"]]
        assert order["total"] == round(sum(i["quantity"] * i["price"] for i in order["items"]), 2)
    assert len({o["order_id"] for o in orders}) == 25


def test_unknown_order_is_a_404(api):
    assert api.get(f"/order/{uuid.uuid4()}").status_code == 404


def test_health_and_metrics_are_open(api):
    del api.headers["Authorization"]
    assert api.get("/health").json() == {"status": "ok"}
    metrics = api.get("/metrics")
    assert metrics.status_code == 200
    assert "orders_rejected_total" in metrics.text
    assert api.get("/all-products-by-category").status_code == 401


def test_rejections_are_counted_by_reason(api):
    def count(reason: str) -> float:
        return order_api.METRICS.get_sample_value("orders_rejected_total", {"reason": reason})

    before = {r: count(r) for r in ("invalid", "too_large", "unauthorized")}
    post(api, with_change("type", "express"))
    post(api, with_change("customer.name", "n" * (MAX_BODY_BYTES + 1)))
    post(api, ORDER, Authorization="Bearer forged")
    assert {r: count(r) - before[r] for r in before} == {"invalid": 1, "too_large": 1,
                                                         "unauthorized": 1}


def test_amqp_priority_is_1_to_10_and_grows_with_the_total():
    values = [amqp_priority(t) for t in (0.01, 1, 10, 99, 100, 1000, 10_000, 10**10)]
    assert values == sorted(values)
    assert values[0] == 1 and values[-1] == 10
    assert all(1 <= v <= 10 for v in values)
