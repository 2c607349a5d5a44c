#!/usr/bin/env python3
"""Benchmark of the order services' JWT validation: validations per second on one thread
with a warm key cache.

A fresh RSA-2048 key is served as a JWKS from 127.0.0.1 (fetched once, before timing);
the tokens are Keycloak-shaped client-credentials access tokens (~1.5 KB) that pass every
check (signature, exp/nbf/iat, iss, aud, client role, scope), each one distinct. Prints a
markdown table row for docs/BENCHMARKS.md.

Usage: .venv/bin/python scripts/bench/jwt_validate.py [--seconds 5] [--repeat 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from order_services.auth import JWTValidator

REALM = "order-management-realm"
CLIENT = "create-orders-client"
TARGET = 5000


def serve_jwks(jwks: dict) -> ThreadingHTTPServer:
    body = json.dumps(jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def keycloak_token(key: rsa.RSAPrivateKey, issuer: str) -> str:
    now = int(time.time())
    claims = {
        "exp": now + 3600, "iat": now, "jti": str(uuid.uuid4()),
        "iss": issuer, "aud": ["order-api", "vault", "account"],
        "sub": str(uuid.uuid4()), "typ": "Bearer", "azp": CLIENT, "acr": "1",
        "realm_access": {"roles": ["default-roles-order-management-realm", "offline_access",
                                   "create-orders-role", "uma_authorization"]},
        "resource_access": {CLIENT: {"roles": ["uma_protection", "create-orders-client-role"]},
                            "account": {"roles": ["manage-account", "manage-account-links",
                                                  "view-profile"]}},
        "scope": "openid profile email create_orders_scope vault_scope",
        "email_verified": False, "preferred_username": f"service-account-{CLIENT}",
        "clientHost": "127.0.0.1", "clientAddress": "127.0.0.1", "client_id": CLIENT,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench-kid", "typ": "JWT"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one timed run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print where the time goes")
    args = parser.parse_args()

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(key.public_key())),
           "kid": "bench-kid", "use": "sig", "alg": "RS256"}
    server = serve_jwks({"keys": [jwk]})
    host, port = server.server_address
    issuer = f"http://{host}:{port}/realms/{REALM}"
    validator = JWTValidator(issuer=issuer, audience="order-api", client=CLIENT,
                             required_role="create-orders-client-role",
                             required_scope="create_orders_scope")
    tokens = [keycloak_token(key, issuer) for _ in range(200)]
    for token in tokens:  # warm the key cache, and check every token really passes
        validator.validate(token)
    assert validator.fetch_count == 1

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            for token in tokens:
                validator.validate(token)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)

    rates = []
    for _ in range(args.repeat):
        count, started = 0, time.perf_counter()
        deadline = started + args.seconds
        while time.perf_counter() < deadline:
            for token in tokens:
                validator.validate(token)
            count += len(tokens)
        rates.append(count / (time.perf_counter() - started))
    server.shutdown()

    rate = statistics.median(rates)
    print("| what | token | runs | median | per validation | target |")
    print("|---|---|---|---|---|---|")
    print(f"| JWT validation (RS256, warm JWKS cache, one thread) | {len(tokens[0])} B "
          f"| {args.repeat} × {args.seconds:g} s | {rate:,.0f} /s | {1e6 / rate:.0f} µs "
          f"| ≥ {TARGET:,} /s |")


if __name__ == "__main__":
    main()
