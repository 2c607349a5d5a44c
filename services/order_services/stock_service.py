"""The stock service: the catalogue and stock reservations, over PostgreSQL.

    python -m order_services.stock_service

Routes (docs/ORDER_FLOW.md):
    GET  /health                          open; 200 {"status": "ok"} while PostgreSQL answers, else 503
    GET  /metrics                         open; Prometheus text format
    GET  /stock/all-categories            {"categories": [...]}
    GET  /stock/all-products-by-category  {category: [{product, price, quantity}]}
    GET  /stock/{category}                {"category", "products": [{product, price, quantity}]}; 404 unknown
    POST /stock/reservations              {"order_id", "items": [{"product", "quantity"}]}
                                          201 reserved; 200 the earlier reservation of this order_id;
                                          409 short of stock (nothing reserved); 404 unknown product

The table `stock` is created and seeded by opsctl; this service creates `reservations`.
A reservation never oversells: one transaction, one conditional UPDATE per product
(`quantity >= wanted`), in a fixed product order so that two reservations never wait on
each other's rows in opposite orders; if any row was not updated, nothing is kept.

Settings (environment): HTTP_HOST, HTTP_PORT, POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB;
the Vault settings of order_services.secrets (credentials postgres_username/_password);
token validation: OIDC_ISSUER, OIDC_AUDIENCE, OIDC_CLIENT, OIDC_REQUIRED_ROLE (+ the optional
STOCK_* of StockAuth); HTTP_LIMIT_CONCURRENCY, HTTP_KEEPALIVE_SECONDS (order_services.bodies).
Bodies as the order API's: at most 64 KiB (413), strict JSON (a duplicate key is a 422), no
control or invisible format characters in the text fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from order_services.auth import AuthError, JWTValidator, add_auth_error_handler, bearer_token
from order_services.bodies import (MAX_BODY_BYTES, BodyLimit, json_safe, parse_body, server_limits,
                                   storable, visible)
from order_services.secrets import VaultSecrets
from order_services.settings import ConfigError, Env

log = logging.getLogger("stock_service")

POOL_MIN, POOL_MAX = 2, 10
POOL_TIMEOUT = 10.0       # seconds a request waits for a free connection
HEALTH_TIMEOUT = 2.0

RESERVATIONS_TABLE = """CREATE TABLE IF NOT EXISTS reservations (
  reservation_id uuid PRIMARY KEY,
  order_id text NOT NULL UNIQUE,
  items jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
)"""

RESERVATIONS = Counter("stock_reservations_total", "Reservation requests by outcome",
                       ["outcome"])  # reserved | replayed | short | unknown_product
RESERVATION_SECONDS = Histogram("stock_reservation_seconds", "Latency of POST /stock/reservations",
                                buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))


# -- who may call ------------------------------------------------------------------------


class StockAuth:
    """Who may call the stock service's routes (all but /health and /metrics): a valid token
    of the realm is not enough, it must hold a role.

    1. People and the Postman client: a token of the realm (OIDC_ISSUER, RS256, unexpired)
       for the order API's audience (OIDC_AUDIENCE) that holds role STOCK_REQUIRED_ROLE (by
       default OIDC_REQUIRED_ROLE, the order API's own) of client OIDC_CLIENT: whoever may
       place orders may read the catalogue, a token without the role may not.
    2. A bundled service that calls this one: a token of the same realm whose `azp` (the
       client it was issued to) is in STOCK_SERVICE_CLIENTS (comma-separated, default
       "order-creator"), for audience STOCK_SERVICE_AUDIENCE (default "stock-api", which the
       realm's service scope adds to the services' client-credentials tokens), holding role
       STOCK_SERVICE_ROLE (default "vault-reader", the role each service account holds) of
       its own client.
    Anything else: 401 for a missing or invalid token, 403 for a valid token of the realm
    that is not allowed (a missing role, or another service's token). No role configured
    at all is a setting error: the service does not start.
    """

    def __init__(self, people: JWTValidator, services: JWTValidator | None,
                 service_clients: frozenset[str], service_role: str = "vault-reader") -> None:
        self.people, self.services, self.service_clients = people, services, service_clients
        self.service_role = service_role

    @classmethod
    def from_env(cls) -> StockAuth:
        settings = Env()
        people = JWTValidator.from_env()  # OIDC_ISSUER, OIDC_AUDIENCE, OIDC_JWKS_URL, OIDC_CLIENT
        people.required_role = settings.text("STOCK_REQUIRED_ROLE") or settings.text("OIDC_REQUIRED_ROLE")
        if people.required_role is None:
            raise ConfigError("no role to require of callers: set OIDC_REQUIRED_ROLE "
                              "(or STOCK_REQUIRED_ROLE)")
        people.required_scope = None
        clients = settings.names("STOCK_SERVICE_CLIENTS", "order-creator")
        services = None
        if clients:
            services = JWTValidator(issuer=people.issuer, jwks_url=people.jwks_url,
                                    audience=settings.text("STOCK_SERVICE_AUDIENCE", "stock-api"))
        return cls(people, services, clients, settings.text("STOCK_SERVICE_ROLE", "vault-reader"))

    def validate(self, token: str) -> dict[str, Any]:
        try:
            return self.people.validate(token)
        except AuthError as refused:
            if refused.status == 403 or self.services is None:
                raise
            try:
                claims = self.services.validate(token)
            except AuthError:
                raise refused from None  # invalid for both: the people's answer says why
            client = claims.get("azp")
            if client not in self.service_clients:
                raise AuthError(403, "insufficient_scope",
                                f"client {client} may not call the stock service",
                                self.people.realm) from None
            access = claims.get("resource_access")
            own = access.get(client) if isinstance(access, dict) else None
            held = own.get("roles") if isinstance(own, dict) else None
            if not isinstance(held, list) or self.service_role not in held:
                raise AuthError(403, "insufficient_scope",
                                f"role {self.service_role} of client {client} required",
                                self.people.realm) from None
            return claims

    async def __call__(self, request: Request) -> dict[str, Any]:
        token = bearer_token(request.headers.get("authorization"), self.people.realm)
        # In a thread: a JWKS fetch (up to its timeout) must not stall the event loop.
        return await run_in_threadpool(self.validate, token)


# -- bodies --------------------------------------------------------------------------------


# As the order API's: text a store can hold and a person can read (order_services.bodies).
Name = Annotated[str, AfterValidator(storable), AfterValidator(visible)]


class ReservationItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    product: Name = Field(min_length=1, max_length=100)
    quantity: int = Field(gt=0, le=1_000_000)


class ReservationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    order_id: Name = Field(min_length=1, max_length=100, pattern=r"\S")
    items: list[ReservationItem] = Field(min_length=1, max_length=100)


# -- the store -------------------------------------------------------------------------------


class StockStore:
    """The SQL of the service, over a psycopg AsyncConnectionPool."""

    def __init__(self, pool) -> None:
        self.pool = pool

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                async with self.pool.connection(timeout=HEALTH_TIMEOUT) as conn:
                    await conn.execute("SELECT 1")
            return True
        except Exception as exc:  # any failure is "not healthy", and says why in the log
            log.warning("PostgreSQL health check failed: %s", exc)
            return False

    async def prepare(self) -> None:
        """At start: the catalogue must be there and readable; reservations is created."""
        async with self.pool.connection() as conn:
            found = await (await conn.execute("SELECT to_regclass('public.stock')")).fetchone()
            if found[0] is None:
                raise ConfigError("table stock does not exist in PostgreSQL: it is created and "
                                  "seeded by opsctl (run: opsctl install)")
            await conn.execute("SELECT count(*) FROM stock")  # permission check
            await conn.execute(RESERVATIONS_TABLE)

    async def products(self, category: str | None = None) -> list[tuple[str, str, float, int]]:
        query = "SELECT category, product, price, quantity FROM stock"
        args: list[Any] = []
        if category is not None:
            query += " WHERE category = %s"
            args.append(category)
        async with self.pool.connection() as conn:
            cursor = await conn.execute(query + " ORDER BY category, product", args)
            return [(c, p, float(price), q) for c, p, price, q in await cursor.fetchall()]

    async def categories(self) -> list[str]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT DISTINCT category FROM stock ORDER BY category")
            return [row[0] for row in await cursor.fetchall()]

    async def reserve(self, order_id: str, items: list[ReservationItem]) -> tuple[int, dict]:
        """(status, body): 201 reserved, 200 replayed, 409 short, 404 unknown product."""
        wanted: dict[str, int] = {}
        for item in items:  # the same product twice counts once, with both quantities
            wanted[item.product] = wanted.get(item.product, 0) + item.quantity
        reserved = [{"product": p, "quantity": q} for p, q in sorted(wanted.items())]
        reservation_id = uuid.uuid4()
        async with self.pool.connection() as conn:
            async with conn.transaction():
                # The reservation row first: a concurrent request for the same order_id waits
                # here on the unique index until this transaction ends, then sees it.
                cursor = await conn.execute(
                    "INSERT INTO reservations (reservation_id, order_id, items) VALUES (%s, %s, %s) "
                    "ON CONFLICT (order_id) DO NOTHING RETURNING created_at",
                    [reservation_id, order_id, json.dumps(reserved)])
                row = await cursor.fetchone()
                if row is None:
                    return 200, await self._reservation(conn, order_id)
                failed = None
                for product, quantity in sorted(wanted.items()):  # fixed order: no deadlocks
                    cursor = await conn.execute(
                        "UPDATE stock SET quantity = quantity - %s "
                        "WHERE product = %s AND quantity >= %s",
                        [quantity, product, quantity])
                    if cursor.rowcount != 1:
                        failed = product
                        break
                if failed is not None:
                    raise _NotReserved(failed)  # leaving the block by an exception: rollback
            created_at = row[0]
        return 201, {"reservation_id": str(reservation_id), "order_id": order_id,
                     "items": reserved, "created_at": created_at.isoformat()}

    async def shortage(self, items: list[ReservationItem]) -> tuple[int, dict]:
        """Why a reservation failed, read after its rollback: unknown products, or short ones."""
        wanted: dict[str, int] = {}
        for item in items:
            wanted[item.product] = wanted.get(item.product, 0) + item.quantity
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT product, quantity FROM stock WHERE product = ANY(%s)",
                                        [list(wanted)])
            available = dict(await cursor.fetchall())
        unknown = sorted(p for p in wanted if p not in available)
        if unknown:
            return 404, {"detail": f"unknown product(s): {', '.join(unknown)}", "unknown": unknown}
        short = [{"product": p, "requested": q, "available": available[p]}
                 for p, q in sorted(wanted.items()) if available[p] < q]
        return 409, {"detail": "not enough stock; nothing was reserved", "short": short}

    @staticmethod
    async def _reservation(conn, order_id: str) -> dict:
        cursor = await conn.execute(
            "SELECT reservation_id, order_id, items, created_at FROM reservations WHERE order_id = %s",
            [order_id])
        rid, oid, items, created_at = await cursor.fetchone()
        return {"reservation_id": str(rid), "order_id": oid, "items": items,
                "created_at": created_at.isoformat()}


class _NotReserved(Exception):
    """Raised inside the transaction so that it rolls back; carries the product that failed."""

    def __init__(self, product: str) -> None:
        super().__init__(product)
        self.product = product


# -- the app ---------------------------------------------------------------------------------


def create_app(store: StockStore, authenticate: Callable[[Request], Awaitable[dict]],
               lifespan=None) -> FastAPI:
    app = FastAPI(title="stock-service", version="1.0", lifespan=lifespan,
                  description="The stock catalogue and reservations (PostgreSQL).")
    add_auth_error_handler(app)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler, except that an echoed NaN or Infinity (which the JSON
        # parser takes) is shown as text: as a number it would make the answer a 500.
        return JSONResponse({"detail": jsonable_encoder(json_safe(exc.errors()))}, 422)
    claims_of = Depends(authenticate)  # a default, not Annotated: annotations are strings here

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        if await store.healthy():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "postgres": "unreachable"}, 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # The fixed paths come before /stock/{category}, which would otherwise take them.
    @app.get("/stock/all-categories")
    async def all_categories(claims: dict = claims_of) -> dict:
        return {"categories": await store.categories()}

    @app.get("/stock/all-products-by-category")
    async def all_products_by_category(claims: dict = claims_of) -> dict:
        catalogue: dict[str, list[dict]] = {}
        for category, product, price, quantity in await store.products():
            catalogue.setdefault(category, []).append(
                {"product": product, "price": price, "quantity": quantity})
        return catalogue

    @app.get("/stock/{category}")
    async def stock_of_category(category: str, claims: dict = claims_of) -> JSONResponse:
        rows = await store.products(category)
        if not rows:
            return JSONResponse({"detail": f"unknown category: {category}"}, 404)
        return JSONResponse({"category": category, "products": [
            {"product": p, "price": price, "quantity": q} for _, p, price, q in rows]})

    @app.post("/stock/reservations", status_code=201, openapi_extra={"requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ReservationRequest.model_json_schema()}}}})
    async def reserve(request: Request, claims: dict = claims_of) -> JSONResponse:
        started = time.perf_counter()
        # Parsed here, after the token (the dependency): strict JSON, no duplicate keys.
        body = parse_body(ReservationRequest, await request.body())
        try:
            try:
                status, answer = await store.reserve(body.order_id, body.items)
            except _NotReserved:
                status, answer = await store.shortage(body.items)
                if status == 409 and not answer["short"]:
                    # Stock came back between the rollback and the look: say so plainly.
                    answer["detail"] = "not enough stock at the time; nothing was reserved, retry"
            outcome = {201: "reserved", 200: "replayed", 409: "short", 404: "unknown_product"}[status]
            RESERVATIONS.labels(outcome).inc()
            if status == 201:
                log.info("reserved %s for order %s", answer["items"], body.order_id)
            return JSONResponse(answer, status)
        finally:
            RESERVATION_SECONDS.observe(time.perf_counter() - started)

    return app


# -- running ---------------------------------------------------------------------------------


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # each Vault login's token request


async def serve() -> int:
    import psycopg
    import uvicorn
    from psycopg_pool import AsyncConnectionPool

    try:
        settings = Env()
        env = settings.require("HTTP_HOST", "HTTP_PORT", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB")
        http_port, pg_port = settings.port("HTTP_PORT"), settings.port("POSTGRES_PORT")
        authenticate = StockAuth.from_env()
        vault = VaultSecrets.from_env()
        limits = server_limits()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        secrets = await asyncio.to_thread(vault.read)
        user, password = secrets["postgres_username"], secrets["postgres_password"]
    except KeyError as exc:
        log.error("cannot start: Vault path %s has no %s", vault.path, exc)
        return 1
    except Exception as exc:
        log.error("cannot start: reading the credentials from Vault at %s failed: %s",
                  vault.client.url, exc)
        return 1

    async def connection_kwargs() -> dict:
        # New connections of the pool ask Vault again, so a rotated password is picked up.
        try:
            fresh = await asyncio.to_thread(vault.read)
            return {"user": fresh["postgres_username"], "password": fresh["postgres_password"],
                    "autocommit": True}
        except Exception as exc:
            log.warning("Vault unreachable for a new PostgreSQL connection (%s); "
                        "using the credentials read at start", exc)
            return {"user": user, "password": password, "autocommit": True}

    conninfo = psycopg.conninfo.make_conninfo(
        host=env["POSTGRES_HOST"], port=pg_port, dbname=env["POSTGRES_DB"],
        application_name="stock-service", connect_timeout=5)
    pool = AsyncConnectionPool(conninfo, kwargs=connection_kwargs, min_size=POOL_MIN,
                               max_size=POOL_MAX, timeout=POOL_TIMEOUT, open=False,
                               name="stock-service")
    try:
        # One plain connection first: a refused connection or a bad password fails at once,
        # with the server's own words, where the pool would keep retrying until its timeout.
        probe = await psycopg.AsyncConnection.connect(conninfo, user=user, password=password)
        await probe.close()
        await pool.open(wait=True, timeout=15)
        store = StockStore(pool)
        await store.prepare()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        await pool.close()
        return 1
    except Exception as exc:
        log.error("cannot start: PostgreSQL at %s:%s (database %s) is not usable: %s",
                  env["POSTGRES_HOST"], pg_port, env["POSTGRES_DB"], " ".join(str(exc).split()))
        await pool.close()
        return 1

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await pool.close()

    app = create_app(store, authenticate, lifespan)
    config = uvicorn.Config(app, host=env["HTTP_HOST"], port=http_port, log_config=None,
                            http="order_services.bodies:IdleBoundedHttp", server_header=False,
                            access_log=True, **limits)
    server = uvicorn.Server(config)
    log.info("stock-service on http://%s:%s (PostgreSQL %s:%s/%s)", env["HTTP_HOST"], http_port,
             env["POSTGRES_HOST"], pg_port, env["POSTGRES_DB"])
    try:
        await server.serve()
    finally:
        if not pool.closed:
            await pool.close()
    return 0 if server.started else 1


def main() -> None:
    configure_logging()
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows)
        uvloop = None
    sys.exit(uvloop.run(serve()) if uvloop else asyncio.run(serve()))


if __name__ == "__main__":
    main()
