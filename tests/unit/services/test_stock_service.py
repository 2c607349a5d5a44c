"""The stock service's door, seen from a client: who may call it (real RS256 tokens, a real
JWKS over HTTP), and what its reservation body may hold. The store is an in-memory fake."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from fastapi.testclient import TestClient

from order_services import bodies
from order_services.settings import ConfigError
from order_services.stock_service import StockAuth, create_app
from tests.unit.services.test_auth import (AUDIENCE, CLIENT, ISSUER, KID, ROLE,  # noqa: F401
                                           JWKSServer, public_jwk, rsa_key)


@pytest.fixture(scope="module")
def jwks(rsa_key):
    server = JWKSServer({"keys": [public_jwk(rsa_key, KID)]})
    yield server
    server.close()


@pytest.fixture
def env(monkeypatch, jwks):
    for name, value in {"OIDC_ISSUER": ISSUER, "OIDC_AUDIENCE": AUDIENCE, "OIDC_CLIENT": CLIENT,
                        "OIDC_REQUIRED_ROLE": ROLE, "OIDC_JWKS_URL": jwks.url,
                        "STOCK_SERVICE_AUDIENCE": "stock-api",
                        "STOCK_SERVICE_ROLE": "vault-reader"}.items():
        monkeypatch.setenv(name, value)
    for name in ("STOCK_REQUIRED_ROLE", "STOCK_SERVICE_CLIENTS"):
        monkeypatch.delenv(name, raising=False)


def token(key, azp: str, audience: str, roles: dict[str, list[str]]) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": audience, "azp": azp, "sub": azp, "iat": now, "exp": now + 300,
              "resource_access": {client: {"roles": r} for client, r in roles.items()}}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


class FakeStore:
    def __init__(self):
        self.reserved = []

    async def categories(self):
        return ["books"]

    async def reserve(self, order_id, items):
        self.reserved.append(order_id)
        return 201, {"order_id": order_id, "items": [i.model_dump() for i in items]}


@pytest.fixture
def client(env):
    store = FakeStore()
    app = create_app(store, StockAuth.from_env())
    client = TestClient(app)
    client.store = store
    return client


def get(client, bearer: str | None):
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return client.get("/stock/all-categories", headers=headers)


def test_a_person_needs_the_order_role(client, rsa_key):
    assert get(client, token(rsa_key, CLIENT, AUDIENCE, {CLIENT: [ROLE]})).status_code == 200
    refused = get(client, token(rsa_key, "postman", AUDIENCE, {CLIENT: []}))
    assert refused.status_code == 403
    assert refused.json()["error_description"] == f"role {ROLE} required"
    assert get(client, None).status_code == 401


def test_the_order_creator_needs_its_service_role(client, rsa_key):
    good = token(rsa_key, "order-creator", "stock-api", {"order-creator": ["vault-reader"]})
    assert get(client, good).status_code == 200
    roleless = token(rsa_key, "order-creator", "stock-api", {"order-creator": []})
    refused = get(client, roleless)
    assert refused.status_code == 403
    assert "role vault-reader of client order-creator required" in refused.json()["error_description"]
    # The role held on another client does not count.
    elsewhere = token(rsa_key, "order-creator", "stock-api", {"premium-consumer": ["vault-reader"]})
    assert get(client, elsewhere).status_code == 403
    other = token(rsa_key, "premium-consumer", "stock-api", {"premium-consumer": ["vault-reader"]})
    assert get(client, other).status_code == 403


def test_no_role_to_require_is_a_setting_error(env, monkeypatch):
    monkeypatch.delenv("OIDC_REQUIRED_ROLE")
    with pytest.raises(ConfigError, match="OIDC_REQUIRED_ROLE"):
        StockAuth.from_env()


@pytest.fixture
def person(rsa_key):
    return {"Authorization": f"Bearer {token(rsa_key, CLIENT, AUDIENCE, {CLIENT: [ROLE]})}",
            "Content-Type": "application/json"}


@pytest.mark.parametrize("raw, loc, kind", [
    (b'{"order_id": "o-\\u0000", "items": [{"product": "Novel", "quantity": 1}]}',
     ["body", "order_id"], "text_unstorable"),
    ('{"order_id": "o-1", "items": [{"product": "No\u200bvel", "quantity": 1}]}'.encode(),
     ["body", "items", 0, "product"], "text_unstorable"),
    ('{"order_id": "\u3164", "items": [{"product": "Novel", "quantity": 1}]}'.encode(),
     ["body", "order_id"], "text_invisible"),
    (b'{"order_id": "o-1", "items": [{"product": "Novel", "quantity": 1, "quantity": 9}]}',
     ["body", "items", 0, "quantity"], "json_duplicate_key"),
    (b'{"order_id": "o-1", "order_id": "o-2", "items": [{"product": "Novel", "quantity": 1}]}',
     ["body", "order_id"], "json_duplicate_key"),
], ids=["NUL", "zero-width", "invisible id", "duplicate in an item", "duplicate at the top"])
def test_a_bad_reservation_body_is_a_422_naming_the_field(client, person, raw, loc, kind):
    response = client.post("/stock/reservations", content=raw, headers=person)
    assert response.status_code == 422, response.text
    assert [loc, kind] in [[e["loc"], e["type"]] for e in response.json()["detail"]]
    assert client.store.reserved == []


def test_a_reservation_body_over_64_kib_is_a_413(client, person):
    big = json.dumps({"order_id": "o-1", "items": [{"product": "n" * 100, "quantity": 1}] * 700})
    assert len(big) > bodies.MAX_BODY_BYTES
    response = client.post("/stock/reservations", content=big, headers=person)
    assert response.status_code == 413
    assert client.store.reserved == []


def test_the_body_is_read_only_after_the_token(client):
    response = client.post("/stock/reservations", content=b"{broken")
    assert response.status_code == 401


def test_a_good_reservation_goes_through(client, person):
    response = client.post("/stock/reservations", headers=person,
                           content=json.dumps({"order_id": "o-1", "items": [
                               {"product": "Novel", "quantity": 2}]}))
    assert response.status_code == 201, response.text
    assert client.store.reserved == ["o-1"]


@pytest.mark.parametrize("env, expected", [
    ({}, {"limit_concurrency": 1000, "timeout_keep_alive": 5}),
    ({"HTTP_LIMIT_CONCURRENCY": "64", "HTTP_KEEPALIVE_SECONDS": "2"},
     {"limit_concurrency": 64, "timeout_keep_alive": 2}),
])
def test_server_limits(env, expected):
    assert bodies.server_limits(env) == expected


@pytest.mark.parametrize("env", [{"HTTP_LIMIT_CONCURRENCY": "0"}, {"HTTP_KEEPALIVE_SECONDS": "x"}])
def test_bad_server_limits_are_refused_by_name(env):
    with pytest.raises(ConfigError, match=next(iter(env))):
        bodies.server_limits(env)
