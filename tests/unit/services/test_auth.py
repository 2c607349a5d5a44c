"""The order services' JWT validation, seen from a client: real RS256 keys, a real JWKS
served over HTTP on 127.0.0.1, and a FastAPI app (plus a plain Starlette one) in front."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from jwt.algorithms import RSAAlgorithm

from order_services.auth import JWTValidator, add_auth_error_handler, require_token

REALM = "order-management-realm"
ISSUER = f"http://127.0.0.1:8080/realms/{REALM}"
AUDIENCE = "order-api"
CLIENT = "create-orders-client"
ROLE = "create-orders-client-role"
SCOPE = "create_orders_scope"
KID = "kid-1"
CHALLENGE = f'Bearer realm="{REALM}"'


# -- keys, JWKS server, clock ---------------------------------------------------------


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: rsa.RSAPrivateKey, kid: str, **extra) -> dict:
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256", **extra}


class JWKSServer:
    """A real HTTP server on 127.0.0.1 serving a JWKS; counts requests; can fail."""

    def __init__(self, jwks: dict) -> None:
        self.jwks = jwks
        self.fetches = 0
        self.fail = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                if outer.fail:
                    self.send_error(503)
                    return
                body = json.dumps(outer.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self.httpd.server_address
        self.url = f"http://{host}:{port}/realms/{REALM}/protocol/openid-connect/certs"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def running_jwks_server():
    server = JWKSServer({})
    yield server
    server.close()


@pytest.fixture
def jwks_server(running_jwks_server, rsa_key) -> JWKSServer:
    # Like Keycloak's: the RS256 signing key plus an encryption key that must be ignored.
    server = running_jwks_server
    server.jwks = {"keys": [public_jwk(rsa_key, KID),
                            public_jwk(rsa_key, "enc-1", use="enc", alg="RSA-OAEP")]}
    server.fetches, server.fail = 0, False
    return server


class Clock:
    """The JWKS cache's clock, moved by hand (token times use the real wall clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_validator(server: JWKSServer, clock: Clock, **overrides) -> JWTValidator:
    settings = dict(issuer=ISSUER, audience=AUDIENCE, jwks_url=server.url, required_role=ROLE,
                    client=CLIENT, clock=clock)
    return JWTValidator(**{**settings, **overrides})


@pytest.fixture
def validator(jwks_server, clock) -> JWTValidator:
    return make_validator(jwks_server, clock)


# -- the apps -------------------------------------------------------------------------


def fastapi_app(validator: JWTValidator) -> FastAPI:
    app = FastAPI()
    add_auth_error_handler(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/orders")
    async def create_order(claims: dict = Depends(require_token(validator))):
        return {"sub": claims["sub"]}

    return app


@pytest.fixture
def client(validator) -> TestClient:
    with TestClient(fastapi_app(validator)) as test_client:
        yield test_client


# -- tokens ---------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def claims(**overrides) -> dict:
    """A Keycloak-shaped access token's claims (client credentials of create-orders-client)."""
    now = int(time.time())
    base = {
        "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()), "iss": ISSUER,
        "aud": [AUDIENCE, "vault"], "sub": "5f1c1f47-6d2b-4e1e-9d1a-0c8d3b0a9e11", "typ": "Bearer",
        "azp": CLIENT, "acr": "1",
        "realm_access": {"roles": ["offline_access", "create-orders-role", "uma_authorization"]},
        "resource_access": {CLIENT: {"roles": ["uma_protection", ROLE]},
                            "account": {"roles": ["manage-account", "view-profile"]}},
        "scope": f"openid profile email {SCOPE}", "clientHost": "127.0.0.1",
        "preferred_username": f"service-account-{CLIENT}", "email_verified": False,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}  # `...` drops a claim


def sign(payload, key, kid: str | None = KID, alg: str = "RS256") -> str:
    # PyJWS, not PyJWT: it signs any payload as given, wrong claim types included.
    headers = {"kid": kid} if kid is not None else {}
    return jwt.api_jws.encode(json.dumps(payload).encode(), key, algorithm=alg, headers=headers)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_refused(response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.json()["error_description"]
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith(CHALLENGE)
    if error != "invalid_request":
        assert f'error="{error}"' in challenge
        assert 'error_description="' in challenge


# -- positives ------------------------------------------------------------------------


def test_valid_token_is_accepted(client, rsa_key):
    response = client.post("/orders", headers=bearer(sign(claims(), rsa_key)))
    assert response.status_code == 200, response.text
    assert response.json() == {"sub": claims()["sub"]}


def test_role_among_others_is_accepted(client, rsa_key):
    roles = {CLIENT: {"roles": ["a", "superadmin", ROLE, "z"]}}
    response = client.post("/orders", headers=bearer(sign(claims(resource_access=roles), rsa_key)))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("aud", [AUDIENCE, ["account", AUDIENCE], [AUDIENCE]])
def test_audience_as_string_or_list_is_accepted(client, rsa_key, aud):
    response = client.post("/orders", headers=bearer(sign(claims(aud=aud), rsa_key)))
    assert response.status_code == 200, response.text


def test_scheme_is_case_insensitive(client, rsa_key):
    response = client.post("/orders", headers={"Authorization": f"bEaReR {sign(claims(), rsa_key)}"})
    assert response.status_code == 200, response.text


def test_expiry_within_leeway_is_accepted(client, rsa_key):
    now = int(time.time())
    token = sign(claims(exp=now - 10, nbf=now + 10, iat=now + 10), rsa_key)
    assert client.post("/orders", headers=bearer(token)).status_code == 200


def test_health_needs_no_token(client, jwks_server):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert jwks_server.fetches == 0


def test_key_rotation_accepted_after_one_refetch(client, validator, jwks_server, clock,
                                                 rsa_key, other_rsa_key):
    assert client.post("/orders", headers=bearer(sign(claims(), rsa_key))).status_code == 200
    assert jwks_server.fetches == 1
    # Keycloak publishes a new key and starts signing with it.
    jwks_server.jwks = {"keys": [public_jwk(rsa_key, KID), public_jwk(other_rsa_key, "kid-2")]}
    clock.now += validator.min_refresh_interval
    rotated = sign(claims(), other_rsa_key, kid="kid-2")
    assert client.post("/orders", headers=bearer(rotated)).status_code == 200
    assert jwks_server.fetches == 2
    # Both keys are now cached: neither token causes another fetch.
    assert client.post("/orders", headers=bearer(rotated)).status_code == 200
    assert client.post("/orders", headers=bearer(sign(claims(), rsa_key))).status_code == 200
    assert jwks_server.fetches == 2


def test_keys_expire_after_ttl(client, validator, jwks_server, clock, rsa_key):
    token = sign(claims(), rsa_key)
    assert client.post("/orders", headers=bearer(token)).status_code == 200
    clock.now += validator.jwks_ttl - 1
    assert client.post("/orders", headers=bearer(token)).status_code == 200
    assert jwks_server.fetches == 1
    clock.now += 2
    # A key removed from the JWKS (revoked) stops working once the cache is refreshed.
    jwks_server.jwks = {"keys": []}
    assert client.post("/orders", headers=bearer(token)).status_code == 200  # empty JWKS ignored
    jwks_server.jwks = {"keys": [public_jwk(rsa_key, "kid-3")]}
    clock.now += validator.jwks_ttl
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")
    assert jwks_server.fetches == 3


def test_jwks_outage_keeps_cached_keys(client, validator, jwks_server, clock, rsa_key):
    token = sign(claims(), rsa_key)
    assert client.post("/orders", headers=bearer(token)).status_code == 200
    jwks_server.fail = True
    clock.now += validator.jwks_ttl + 1
    assert client.post("/orders", headers=bearer(token)).status_code == 200
    assert client.post("/orders", headers=bearer(token)).status_code == 200
    assert jwks_server.fetches == 2  # one failed refresh, then rate-limited


def test_no_keys_at_all_is_401_not_500(client, jwks_server, rsa_key):
    jwks_server.fail = True
    response = client.post("/orders", headers=bearer(sign(claims(), rsa_key)))
    assert_refused(response, 401, "invalid_token")


def test_unreachable_jwks_is_401_not_500(clock, rsa_key):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    validator = JWTValidator(issuer=ISSUER, audience=AUDIENCE, clock=clock, http_timeout=0.5,
                             jwks_url=f"http://127.0.0.1:{port}/certs")
    with TestClient(fastapi_app(validator)) as client:
        response = client.post("/orders", headers=bearer(sign(claims(), rsa_key)))
    assert_refused(response, 401, "invalid_token")


def test_concurrent_cold_start_fetches_once(validator, jwks_server, rsa_key):
    token = sign(claims(), rsa_key)
    results, start = [], threading.Barrier(8)

    def worker():
        start.wait()
        results.append(validator.validate(token)["sub"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [claims()["sub"]] * 8
    assert jwks_server.fetches == 1


# -- header hygiene -------------------------------------------------------------------


def test_missing_header(client):
    response = client.post("/orders")
    assert_refused(response, 401, "invalid_request")
    assert response.headers["www-authenticate"] == CHALLENGE  # RFC 6750 3.1: no error code


def test_wrong_scheme(client, rsa_key):
    token = sign(claims(), rsa_key)
    response = client.post("/orders", headers={"Authorization": f"Basic {token}"})
    assert_refused(response, 401, "invalid_request")
    basic = base64.b64encode(b"user:password").decode()
    assert_refused(client.post("/orders", headers={"Authorization": f"Basic {basic}"}),
                   401, "invalid_request")


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer    "])
def test_empty_bearer(client, header):
    assert_refused(client.post("/orders", headers={"Authorization": header}), 401, "invalid_request")


def test_oversized_token_refused_before_parsing(client, jwks_server, rsa_key):
    # Correctly signed, so only the size limit can refuse it; the cache stays cold.
    big = sign(claims(padding="x" * 9000), rsa_key)
    response = client.post("/orders", headers=bearer(big))
    assert_refused(response, 401, "invalid_token")
    assert "too large" in response.json()["error_description"]
    assert jwks_server.fetches == 0
    # Just under the limit, the same kind of token is fine.
    near = sign(claims(padding="x" * 5000), rsa_key)
    assert 5000 < len(near) < 8192
    assert client.post("/orders", headers=bearer(near)).status_code == 200


@pytest.mark.parametrize("garbage", ["garbage", "a.b", "a.b.c.d", "!!!.???.***",
                                     "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "Bearer x"])
def test_garbage(client, garbage):
    assert_refused(client.post("/orders", headers=bearer(garbage)), 401, "invalid_token")


# -- algorithms -----------------------------------------------------------------------


def test_alg_none_refused_without_key_lookup(client, jwks_server):
    token = f"{b64json({'alg': 'none', 'kid': KID, 'typ': 'JWT'})}.{b64json(claims())}."
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")
    assert jwks_server.fetches == 0


def test_hs256_with_public_key_as_secret(client, jwks_server, rsa_key):
    # The classic key-confusion attack: HMAC keyed with the RSA public key, which anyone has.
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64json({'alg': 'HS256', 'kid': KID, 'typ': 'JWT'})}.{b64json(claims())}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64(signature)}"
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")
    assert jwks_server.fetches == 0


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # on purpose
@pytest.mark.parametrize("alg", ["RS512", "PS256", "ES256", "HS256"])
def test_other_algorithms_refused(client, jwks_server, rsa_key, alg):
    # RS512/PS256 are signed with the realm's real key: right key, wrong algorithm.
    key = {"ES256": ec.generate_private_key(ec.SECP256R1()), "HS256": "secret"}.get(alg, rsa_key)
    token = sign(claims(), key, alg=alg)
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")
    assert jwks_server.fetches == 0


# -- keys -----------------------------------------------------------------------------


def test_unknown_kid_refused(client, jwks_server, rsa_key):
    response = client.post("/orders", headers=bearer(sign(claims(), rsa_key, kid="nope")))
    assert_refused(response, 401, "invalid_token")
    assert jwks_server.fetches == 1


def test_missing_kid_refused(client, rsa_key):
    response = client.post("/orders", headers=bearer(sign(claims(), rsa_key, kid=None)))
    assert_refused(response, 401, "invalid_token")


def test_random_kid_flood_is_rate_limited(client, validator, jwks_server, clock, rsa_key):
    assert client.post("/orders", headers=bearer(sign(claims(), rsa_key))).status_code == 200
    assert jwks_server.fetches == 1
    # Right after a fetch: unknown kids are refused without asking Keycloak again.
    for _ in range(50):
        token = sign(claims(), rsa_key, kid=str(uuid.uuid4()))
        assert client.post("/orders", headers=bearer(token)).status_code == 401
    assert jwks_server.fetches == 1
    # Once the interval has passed: one refetch for the whole flood, not fifty.
    clock.now += validator.min_refresh_interval
    for _ in range(50):
        token = sign(claims(), rsa_key, kid=str(uuid.uuid4()))
        assert client.post("/orders", headers=bearer(token)).status_code == 401
    assert jwks_server.fetches == 2
    # And the real key still works throughout.
    assert client.post("/orders", headers=bearer(sign(claims(), rsa_key))).status_code == 200


def test_critical_header_refused(client, rsa_key):
    token = jwt.api_jws.encode(json.dumps(claims()).encode(), rsa_key, algorithm="RS256",
                               headers={"kid": KID, "crit": ["exp"], "exp": 1})
    assert_refused(client.post("/orders", headers=bearer(token)), 401, "invalid_token")


def test_token_signed_by_another_key_refused(client, rsa_key, other_rsa_key):
    response = client.post("/orders", headers=bearer(sign(claims(), other_rsa_key)))
    assert_refused(response, 401, "invalid_token")


@pytest.mark.parametrize("jwk_extra", [{"use": "enc"}, {"alg": "RS512"}, {"alg": "RSA-OAEP"}])
def test_non_signing_jwks_keys_ignored(jwks_server, clock, rsa_key, jwk_extra):
    jwks_server.jwks = {"keys": [public_jwk(rsa_key, KID, **jwk_extra)]}
    with TestClient(fastapi_app(make_validator(jwks_server, clock))) as client:
        response = client.post("/orders", headers=bearer(sign(claims(), rsa_key)))
    assert_refused(response, 401, "invalid_token")


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # on purpose
def test_small_rsa_keys_ignored(jwks_server, clock):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    jwks_server.jwks = {"keys": [public_jwk(weak, KID)]}
    with TestClient(fastapi_app(make_validator(jwks_server, clock))) as client:
        response = client.post("/orders", headers=bearer(sign(claims(), weak)))
    assert_refused(response, 401, "invalid_token")
