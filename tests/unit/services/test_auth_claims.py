"""The order services' JWT validation of a token's claims and its use in apps, seen from a
client (keys, JWKS server and apps as in test_auth)."""

from __future__ import annotations

import time

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from order_services.auth import AuthError, JWTValidator, require_token, requires_token
from tests.unit.services.test_auth import (AUDIENCE, CHALLENGE, CLIENT, ISSUER, REALM, ROLE, SCOPE,  # noqa: F401
                                           assert_refused, b64json, bearer, claims, client, clock,
                                           fastapi_app, jwks_server, make_validator, rsa_key,
                                           running_jwks_server, sign, validator)


# -- claims ---------------------------------------------------------------------------


def test_payload_tampered(client, rsa_key):
    # A valid token for a caller without the role; the caller swaps in a payload that has it.
    signed = sign(claims(resource_access={CLIENT: {"roles": []}}), rsa_key)
    header, _, signature = signed.split(".")
    forged = f"{header}.{b64json(claims())}.{signature}"
    assert_refused(client.post("/orders", headers=bearer(forged)), 401, "invalid_token")


def test_expired(client, rsa_key):
    token = sign(claims(exp=int(time.time()) - 120), rsa_key)
    response = client.post("/orders", headers=bearer(token))
    assert_refused(response, 401, "invalid_token")
    assert "expired" in response.headers["www-authenticate"]


def test_not_yet_valid(client, rsa_key):
    token = sign(claims(nbf=int(time.time()) + 120), rsa_key)
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")


def test_issued_in_the_future(client, rsa_key):
    token = sign(claims(iat=int(time.time()) + 120), rsa_key)
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")


@pytest.mark.parametrize("iss", ["http://127.0.0.1:8080/realms/other-realm", ISSUER + "/",
                                 ISSUER.upper(), ISSUER + "x", [ISSUER], ...])
def test_wrong_issuer(client, rsa_key, iss):
    token = sign(claims(iss=iss), rsa_key)
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")


@pytest.mark.parametrize("aud", ["vault", ["vault", "account"], "order-api-x", [], ...])
def test_wrong_audience(client, rsa_key, aud):
    token = sign(claims(aud=aud), rsa_key)
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")


def test_missing_expiry(client, rsa_key):
    response = client.post("/orders", headers=bearer(sign(claims(exp=...), rsa_key)))
    assert_refused(response, 401, "invalid_token")
    assert response.json()["error_description"] == "token has no expiry"


def test_role_missing_is_403(client, rsa_key):
    token = sign(claims(resource_access={CLIENT: {"roles": ["uma_protection"]}}), rsa_key)
    response = client.post("/orders", headers=bearer(token))
    assert_refused(response, 403, "insufficient_scope")


@pytest.mark.parametrize("access", [{}, {"account": {"roles": [ROLE]}}, {CLIENT: {}}, ...])
def test_role_not_under_the_client_is_403(client, rsa_key, access):
    token = sign(claims(resource_access=access), rsa_key)
    assert_refused(client.post("/orders", headers=bearer(token)), 403, "insufficient_scope")


@pytest.mark.parametrize("roles", [["super" + ROLE], [ROLE + "-lite"], [ROLE.upper()],
                                   [[ROLE]], [f" {ROLE}"]])
def test_role_only_as_substring_is_403(client, rsa_key, roles):
    token = sign(claims(resource_access={CLIENT: {"roles": roles}}), rsa_key)
    assert_refused(client.post("/orders", headers=bearer(token)), 403, "insufficient_scope")


@pytest.mark.parametrize("bad", [
    {"resource_access": {CLIENT: {"roles": f"x {ROLE} y"}}},  # a roles string, not a list
    {"resource_access": {CLIENT: {"roles": {ROLE: True}}}},
    {"resource_access": {CLIENT: [ROLE]}},
    {"resource_access": [ROLE]},
    {"aud": 42},
    {"aud": [AUDIENCE, 42]},
    {"exp": str(int(time.time()) + 300)},
    {"exp": True},
    {"nbf": "0"},
    {"iat": [1]},
    {"sub": 7},
])
def test_wrong_claim_types_are_401(client, rsa_key, bad):
    token = sign(claims(**bad), rsa_key)
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")


@pytest.mark.parametrize("payload", [[1, 2], "claims", 42, None])
def test_non_object_payload_is_401(client, rsa_key, payload):
    token = sign(payload, rsa_key)
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")


def test_realm_role_when_no_client(jwks_server, clock, rsa_key):
    validator = make_validator(jwks_server, clock, client=None, required_role="create-orders-role")
    with TestClient(fastapi_app(validator)) as client:
        assert client.post("/orders", headers=bearer(sign(claims(), rsa_key))).status_code == 200
        # The client role of the same name does not count as the realm role.
        token = sign(claims(realm_access={"roles": ["create-orders-role-x"]},
                            resource_access={CLIENT: {"roles": ["create-orders-role"]}}), rsa_key)
        assert_refused(client.post("/orders", headers=bearer(token)), 403, "insufficient_scope")
        token = sign(claims(realm_access={"roles": "create-orders-role"}), rsa_key)
        assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")


@pytest.mark.parametrize("scope,status", [
    (f"openid {SCOPE} email", 200), (SCOPE, 200), (f"{SCOPE}_extra openid", 403),
    ("openid", 403), (..., 403), ([SCOPE], 401),
])
def test_required_scope(jwks_server, clock, rsa_key, scope, status):
    validator = make_validator(jwks_server, clock, required_scope=SCOPE)
    with TestClient(fastapi_app(validator)) as client:
        response = client.post("/orders", headers=bearer(sign(claims(scope=scope), rsa_key)))
    assert response.status_code == status, response.text
    if status != 200:
        assert_refused(response, status, "insufficient_scope" if status == 403 else "invalid_token")


# -- the decorator for plain Starlette handlers ---------------------------------------


def test_decorator_on_a_starlette_handler(validator, rsa_key):
    @requires_token(validator)
    async def create_order(request):
        return JSONResponse({"sub": request.state.claims["sub"]})

    async def health(request):
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/orders", create_order, methods=["POST"]),
                            Route("/health", health)])
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        response = client.post("/orders", headers=bearer(sign(claims(), rsa_key)))
        assert response.status_code == 200
        assert response.json() == {"sub": claims()["sub"]}
        assert_refused(client.post("/orders"), 401, "invalid_request")
        token = sign(claims(resource_access={}), rsa_key)
        assert_refused(client.post("/orders", headers=bearer(token)), 403, "insufficient_scope")


def test_validate_raises_only_auth_error(validator, rsa_key):
    for token in ["", None, 42, b"x.y.z", "a" * 10000, "x.y.z", "é.é.é", "a\x00.b.c",
                  sign(claims(aud=42), rsa_key), sign([1, 2], rsa_key), sign("x", rsa_key)]:
        with pytest.raises(AuthError) as info:
            validator.validate(token)
        assert info.value.status == 401


def test_without_the_handler_the_status_and_challenge_survive(validator, rsa_key):
    # An app that forgot add_auth_error_handler still refuses with 401 and the challenge.
    app = FastAPI()

    @app.get("/orders")
    async def orders(claims: dict = Depends(require_token(validator))):
        return claims

    with TestClient(app) as client:
        response = client.get("/orders", headers=bearer("x.y.z"))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith(CHALLENGE)


def test_settings_from_environment(monkeypatch, jwks_server, rsa_key):
    for name in ("JWKS_URL", "REQUIRED_SCOPE"):
        monkeypatch.delenv(f"OIDC_{name}", raising=False)
    monkeypatch.setenv("OIDC_AUDIENCE", AUDIENCE)
    from order_services.settings import ConfigError

    with pytest.raises(ConfigError, match="OIDC_ISSUER"):
        JWTValidator.from_env()
    monkeypatch.setenv("OIDC_ISSUER", ISSUER)
    monkeypatch.setenv("OIDC_CLIENT", CLIENT)
    monkeypatch.setenv("OIDC_REQUIRED_ROLE", ROLE)
    validator = JWTValidator.from_env()
    assert validator.jwks_url == f"{ISSUER}/protocol/openid-connect/certs"  # Keycloak's
    assert validator.realm == REALM
    monkeypatch.setenv("OIDC_JWKS_URL", jwks_server.url)
    with TestClient(fastapi_app(JWTValidator.from_env())) as client:
        assert client.post("/orders", headers=bearer(sign(claims(), rsa_key))).status_code == 200
        token = sign(claims(resource_access={}), rsa_key)
        assert_refused(client.post("/orders", headers=bearer(token)), 403, "insufficient_scope")
