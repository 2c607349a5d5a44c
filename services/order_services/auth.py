"""Validation of the Keycloak access tokens that callers of the order services present.

    validator = JWTValidator(issuer="http://127.0.0.1:8080/realms/order-management-realm",
                             audience="order-api", required_role="create-orders-client-role",
                             client="create-orders-client")
    claims = validator.validate(token)           # AuthError(401|403, ...) when not acceptable

    @app.post("/orders")                         # FastAPI: the dependency gives the claims
    async def create(claims: dict = Depends(require_token(validator))): ...
    add_auth_error_handler(app)                  # renders AuthError as an RFC 6750 JSON body

    @requires_token(validator)                   # plain Starlette handler: request.state.claims
    async def handler(request): ...

Only RS256 is accepted, with the key chosen by `kid` from the realm's JWKS, which is
cached here (the one piece of mutable state, behind a lock). Health and metrics
endpoints simply don't use any of this.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import math
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from jwt.algorithms import RSAAlgorithm  # PyJWT parses the JWKS keys; tokens are checked here
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8 * 1024  # far above a Keycloak token (~1-2 KB); refuse before parsing
MAX_JWKS_BYTES = 1024 * 1024
MIN_RSA_BITS = 2048
# Three base64url segments; anything else is garbage and never reaches the parser.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# RFC 6750 error_description: printable ASCII without '"' and '\'.
_UNSAFE_DESCRIPTION = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


class AuthError(HTTPException):
    """A refused request: 401 (no or bad token) or 403 (good token, missing role/scope).

    An HTTPException so that an app that forgot add_auth_error_handler still answers
    with the right status and WWW-Authenticate header (only the body differs).
    """

    def __init__(self, status: int, error: str, description: str, realm: str = "") -> None:
        self.status = status
        self.error = error
        self.description = _UNSAFE_DESCRIPTION.sub("?", description)
        self.realm = realm
        super().__init__(status, self.description, {"WWW-Authenticate": self.www_authenticate})

    @property
    def www_authenticate(self) -> str:
        challenge = f'Bearer realm="{self.realm}"'
        # RFC 6750 3.1: a request without credentials gets the bare challenge, no error code.
        if self.error == "invalid_request":
            return challenge
        return f'{challenge}, error="{self.error}", error_description="{self.description}"'

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, {"WWW-Authenticate": self.www_authenticate})


def _is_number(value: Any) -> bool:
    # A NumericDate is a JSON number: not a bool (an int in Python), not a numeric string.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class JWTValidator:
    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        required_role: str | None = None,
        required_scope: str | None = None,
        client: str | None = None,
        leeway: float = 30,
        jwks_ttl: float = 300,
        min_refresh_interval: float = 30,
        http_timeout: float = 2,
        realm: str | None = None,
        clock: Callable[[], float] = time.monotonic,  # the JWKS cache's clock (tests move it)
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks_url = jwks_url or f"{issuer.rstrip('/')}/protocol/openid-connect/certs"
        if urlparse(self.jwks_url).scheme not in ("http", "https"):
            raise ValueError(f"jwks_url must be http(s): {self.jwks_url}")
        self.required_role = required_role
        self.required_scope = required_scope
        self.client = client
        self.leeway = leeway
        self.jwks_ttl = jwks_ttl
        self.min_refresh_interval = min_refresh_interval
        self.http_timeout = http_timeout
        self.realm = realm or issuer.rstrip("/").rsplit("/", 1)[-1]
        self._clock = clock
        # The JWKS cache: parsed public keys by kid. _lock guards these fields;
        # _fetch_lock lets one thread fetch while the others wait for its result.
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._keys: dict[str, RSAPublicKey] = {}
        self._fetched_at = -math.inf  # last successful fetch
        self._attempted_at = -math.inf  # last fetch attempt, successful or not
        self.fetch_count = 0

    @classmethod
    def from_env(cls, prefix: str = "OIDC_") -> JWTValidator:
        """OIDC_ISSUER and OIDC_AUDIENCE (required); OIDC_JWKS_URL, OIDC_REQUIRED_ROLE,
        OIDC_REQUIRED_SCOPE, OIDC_CLIENT (optional)."""
        from order_services.settings import ConfigError, Env

        Env().require(prefix + "ISSUER", prefix + "AUDIENCE")
        env = lambda name: os.environ.get(prefix + name) or None  # noqa: E731
        try:
            return cls(issuer=env("ISSUER"), audience=env("AUDIENCE"), jwks_url=env("JWKS_URL"),
                       required_role=env("REQUIRED_ROLE"), required_scope=env("REQUIRED_SCOPE"),
                       client=env("CLIENT"))
        except ValueError as e:
            raise ConfigError(f"{prefix}JWKS_URL: {e}") from None

    # -- validation --------------------------------------------------------------

    def _fail(self, description: str, status: int = 401) -> AuthError:
        error = "invalid_token" if status == 401 else "insufficient_scope"
        return AuthError(status, error, description, self.realm)

    def validate(self, token: str) -> dict[str, Any]:
        """The token's claims, or AuthError. Never raises anything else for any input."""
        try:
            return self._validate(token)
        except AuthError:
            raise
        except Exception:  # a malformed token must never become a 500
            log.debug("token rejected by an unexpected error", exc_info=True)
            raise self._fail("malformed token") from None

    def _validate(self, token: str) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise self._fail("missing token")
        if len(token) > MAX_TOKEN_BYTES:
            raise self._fail("token too large")
        if not _COMPACT_JWS.fullmatch(token):
            raise self._fail("malformed token")
        # Each segment is decoded once, and the signature checked with cryptography
        # directly: PyJWT's decode costs ~5x the RSA verify itself (scripts/bench/jwt_validate.py).
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = json.loads(_b64decode(header_b64))
        if not isinstance(header, dict):
            raise self._fail("malformed token")
        # The algorithm is pinned before any key is looked up: this is what stops
        # alg=none and HS256-with-the-public-key-as-secret.
        if header.get("alg") != "RS256":
            raise self._fail("unsupported algorithm")
        if "crit" in header:  # RFC 7515 4.1.11: no extension is understood here
            raise self._fail("unsupported critical header")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise self._fail("token has no key id")
        key = self._key_for(kid)
        if key is None:
            raise self._fail("unknown signing key")
        try:
            key.verify(_b64decode(signature_b64), f"{header_b64}.{payload_b64}".encode(),
                       PKCS1v15(), SHA256())
        except InvalidSignature:
            raise self._fail("bad signature") from None
        claims = json.loads(_b64decode(payload_b64))
        if not isinstance(claims, dict):
            raise self._fail("malformed token")
        self._check_times(claims)
        if claims.get("iss") != self.issuer:  # exact: no prefix, case or slash games
            raise self._fail("wrong issuer")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if (not isinstance(audiences, list) or self.audience not in audiences
                or not all(isinstance(a, str) for a in audiences)):
            raise self._fail("wrong audience")
        for name in ("sub", "jti", "azp"):
            if name in claims and not isinstance(claims[name], str):
                raise self._fail(f"claim {name} is not a string")
        self._check_role(claims)
        self._check_scope(claims)
        return claims

    def _check_times(self, claims: dict[str, Any]) -> None:
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _is_number(claims[name]):
                raise self._fail(f"claim {name} is not a number")
        now = time.time()
        if "exp" not in claims:
            raise self._fail("token has no expiry")
        # The leeway absorbs clock skew between Keycloak and this host, nothing more.
        if claims["exp"] <= now - self.leeway:
            raise self._fail("token expired")
        if claims.get("nbf", -math.inf) > now + self.leeway:
            raise self._fail("token not yet valid")
        if claims.get("iat", -math.inf) > now + self.leeway:
            raise self._fail("token issued in the future")

    def _check_role(self, claims: dict[str, Any]) -> None:
        if self.required_role is None:
            return
        if self.client is None:
            holder = claims.get("realm_access", {})
        else:
            access = claims.get("resource_access", {})
            if not isinstance(access, dict):
                raise self._fail("resource_access is not an object")
            holder = access.get(self.client, {})
        if not isinstance(holder, dict):
            raise self._fail("role claim is not an object")
        roles = holder.get("roles", [])
        if not isinstance(roles, list):
            raise self._fail("roles is not a list")
        # List membership is exact equality: "admin" never matches "superadmin".
        if self.required_role not in roles:
            raise self._fail(f"role {self.required_role} required", 403)

    def _check_scope(self, claims: dict[str, Any]) -> None:
        if self.required_scope is None:
            return
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise self._fail("scope is not a string")
        if self.required_scope not in scope.split():
            raise self._fail(f"scope {self.required_scope} required", 403)

    # -- the JWKS cache ------------------------------------------------------------

    def _key_for(self, kid: str) -> RSAPublicKey | None:
        """The key for kid: from the cache while fresh, else after one rate-limited refetch."""
        with self._lock:
            key = self._keys.get(kid)
            if key is not None and not self._should_fetch(key):
                return key  # fresh, or stale but not yet time to refetch
        # Unknown kid or time to refresh. _fetch_lock makes a caller wait for a fetch
        # already in flight (a cold start's burst all gets the keys) instead of failing.
        with self._fetch_lock:
            with self._lock:
                key = self._keys.get(kid)
                if not self._should_fetch(key):
                    return key
                self._attempted_at = self._clock()
            keys = self._fetch()  # outside _lock: validations with cached keys go on
            with self._lock:
                if keys:
                    self._keys, self._fetched_at = keys, self._clock()
                # On failure the old keys stay: a JWKS outage doesn't log everyone out.
                return self._keys.get(kid)

    def _should_fetch(self, key: RSAPublicKey | None) -> bool:
        now = self._clock()
        if key is not None and now - self._fetched_at < self.jwks_ttl:
            return False
        # Unknown kid or stale cache: at most one fetch per interval, so a flood of
        # tokens with made-up kids cannot turn into a flood of requests to Keycloak.
        return now - self._attempted_at >= self.min_refresh_interval

    def _fetch(self) -> dict[str, RSAPublicKey] | None:
        self.fetch_count += 1
        try:
            with urllib.request.urlopen(self.jwks_url, timeout=self.http_timeout) as response:
                document = json.loads(response.read(MAX_JWKS_BYTES + 1)[:MAX_JWKS_BYTES])
            keys = _signing_keys(document)
        except Exception as exc:
            log.warning("JWKS fetch from %s failed: %s", self.jwks_url, exc)
            return None
        if not keys:
            log.warning("JWKS at %s has no RS256 signing key", self.jwks_url)
        return keys or None


def _signing_keys(document: Any) -> dict[str, RSAPublicKey]:
    """kid -> public key for the RSA signature keys of a JWKS; others (enc, EC, HS) skipped."""
    keys: dict[str, RSAPublicKey] = {}
    for jwk in document.get("keys", []) if isinstance(document, dict) else []:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            continue
        if jwk.get("kty") != "RSA" or jwk.get("use") != "sig" or jwk.get("alg", "RS256") != "RS256":
            continue
        try:
            key = RSAAlgorithm.from_jwk(jwk)
        except Exception:
            log.warning("JWKS key %s is not a valid RSA key; skipped", jwk["kid"])
            continue
        if isinstance(key, RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
            keys[jwk["kid"]] = key
    return keys


def _b64decode(segment: str) -> bytes:
    # The token already matched _COMPACT_JWS, so only the padding is missing.
    if len(segment) % 4 == 1:
        raise binascii.Error("impossible base64url length")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# -- HTTP glue -----------------------------------------------------------------------


def bearer_token(authorization: str | None, realm: str = "") -> str:
    """The token of an `Authorization: Bearer <token>` header, or AuthError(401)."""
    if not authorization:
        raise AuthError(401, "invalid_request", "missing bearer token", realm)
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError(401, "invalid_request", "bearer token required", realm)
    token = token.strip()
    if not token:
        raise AuthError(401, "invalid_request", "empty bearer token", realm)
    return token


async def _claims_of(request: Request, validator: JWTValidator) -> dict[str, Any]:
    token = bearer_token(request.headers.get("authorization"), validator.realm)
    # In a thread: a JWKS fetch (up to http_timeout) must not stall the event loop.
    return await run_in_threadpool(validator.validate, token)


def require_token(validator: JWTValidator) -> Callable[..., Any]:
    """A FastAPI dependency that gives the token's claims (pair with add_auth_error_handler)."""

    async def claims(request: Request) -> dict[str, Any]:
        return await _claims_of(request, validator)

    return claims


def add_auth_error_handler(app: Any) -> None:
    """Renders AuthError as {"error", "error_description"} with its WWW-Authenticate header."""

    async def handle(request: Request, exc: AuthError) -> JSONResponse:
        return exc.response()

    app.add_exception_handler(AuthError, handle)


def requires_token(validator: JWTValidator) -> Callable[..., Any]:
    """Decorator for a plain async handler taking a Starlette Request first; the claims
    are in request.state.claims."""

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        async def wrapper(request: Request, *args: Any, **kwargs: Any) -> Any:
            try:
                request.state.claims = await _claims_of(request, validator)
            except AuthError as exc:
                return exc.response()
            return await handler(request, *args, **kwargs)

        return wrapper

    return decorate


def validate_jwt(validator: JWTValidator, token: str) -> dict[str, Any]:
    """The claims of token as validator accepts them, or AuthError (see JWTValidator.validate)."""
    return validator.validate(token)
