"""The order API: validates an order, publishes it to RabbitMQ with publisher confirms, and
answers only once the broker has it.

    python -m order_services.order_creator

Routes (docs/ORDER_FLOW.md):
    GET  /health                    open; 200 {"status": "ok"} while RabbitMQ and Redis answer, else 503
    GET  /metrics                   open; Prometheus text format
    POST /orders                    one order (see Order); 201 with the order document once the
                                    broker confirmed it; optional header Idempotency-Key
    POST /create                    {"number_of_orders": N}: N random orders from the catalogue
    GET  /order/{order_id}          the order document, from the Redis cache
    GET  /all-products-by-category  the catalogue, a copy of the stock service's

Every route but /health and /metrics needs a token accepted by JWTValidator.from_env()
(OIDC_ISSUER, OIDC_AUDIENCE, OIDC_CLIENT, OIDC_REQUIRED_ROLE).

What a client can rely on:
- 201 means the broker confirmed the order (persistent, routed to its queue): it will be
  processed. 503 means it was not accepted: retry (with the same Idempotency-Key, safely).
  When the broker may have it all the same (its confirm timed out, the connection dropped
  after sending), the key stays bound to that order_id (the 503 names it) and a retry with
  the key publishes that same document again: never a second order.
- 4xx (a bad token, a bad or oversized body, a reused key) means nothing was published.
  The body is parsed strictly: a duplicate JSON key, a control or invisible format character
  in a text field, a name made only of invisible characters, a price under 0.01 or with
  more than two decimals are each a 422 naming the field; two Idempotency-Key headers a 400.
- The Redis copy (`order:<order_id>`) is a cache: a failure to write it is logged and does
  not turn an accepted order into an error.

Settings (environment): HTTP_HOST, HTTP_PORT, RABBITMQ_HOST, RABBITMQ_PORT, ORDER_EXCHANGE,
REDIS_HOST, REDIS_PORT, STOCK_URL; the Vault settings of order_services.secrets
(credentials rabbitmq_* and redis_*) and OIDC_TOKEN_URL/OIDC_CLIENT_ID/OIDC_CLIENT_SECRET,
which also give the token this service shows the stock service. Optional: HTTP_LIMIT_CONCURRENCY
and HTTP_KEEPALIVE_SECONDS (order_services.bodies.server_limits), and WEB_CONCURRENCY,
the number of serving processes (default 2, 1 on a one-core machine): one Python process
tops out near one core, 750-810 orders/s on the 2-core development machine with RabbitMQ,
Redis and the load generator (wrk, 32 connections) beside it; two reached 1,135-1,170/s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from order_services.auth import AuthError, JWTValidator, add_auth_error_handler, require_token
from order_services.bodies import (MAX_BODY_BYTES, BodyLimit, parse_body, server_limits,
                                   storable, visible)
from order_services.secrets import KeycloakToken, VaultSecrets
from order_services.settings import ConfigError, Env

log = logging.getLogger("order_creator")

IDEMPOTENCY_TTL = 86400          # seconds a key is remembered (contract: idempotency:<key>)
ORDER_CACHE_TTL = 7 * 86400      # seconds order:<id> is kept; longer than IDEMPOTENCY_TTL
PUBLISH_TIMEOUT = 10.0           # seconds to wait for the broker's confirm
RECONNECT_INTERVAL = 1.0         # seconds between attempts to reach a lost broker
RECOVERY_WAIT = 3.0              # seconds an order waits for a reconnecting broker before a 503
REDIS_TIMEOUT = 2.0
CATALOGUE_REFRESH = 300.0        # seconds between catalogue refreshes
CATALOGUE_RETRY = (2.0, 60.0)    # first and longest delay after a failed refresh
CREATE_CONCURRENCY = 64          # publishes in flight for one POST /create
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII, as HTTP headers carry it

# A registry of this module's own: `python -m` runs this file as __main__ and uvicorn imports
# it again by name (and a worker process does the same as __mp_main__), so the metrics are
# created more than once in a process; each copy keeps to its own registry.
METRICS = CollectorRegistry(auto_describe=True)
for _collector in (ProcessCollector, PlatformCollector, GCCollector):
    _collector(registry=METRICS)
ORDERS_ACCEPTED = Counter("orders_accepted_total", "Orders the broker confirmed", ["type"],
                          registry=METRICS)
ORDERS_REJECTED = Counter("orders_rejected_total", "Order requests not accepted", ["reason"],
                          registry=METRICS)
ORDER_SECONDS = Histogram(
    "order_request_seconds", "Latency of POST /orders, token check to answer",
    buckets=(.001, .0025, .005, .01, .025, .05, .075, .1, .25, .5, 1, 2.5, 5, 10), registry=METRICS)
for _reason in ("invalid", "too_large", "unsupported_media_type", "unauthorized", "forbidden",
                "idempotency_conflict", "broker_unavailable", "idempotency_unavailable"):
    ORDERS_REJECTED.labels(_reason)  # present at 0 from the start, so rates work at once
for _type in ("priority", "regular", "digital"):
    ORDERS_ACCEPTED.labels(_type)


# -- the order, as a client sends it --------------------------------------------------------


class _Strict(BaseModel):
    # strict: "1" is not a quantity, 1.5 is not an int, true is not a number.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _cents(price: float) -> float:
    # 1e-300 would pass "greater than 0" and make a total of 0.00.
    if float(f"{price:.2f}") != price:
        raise PydanticCustomError("price_precision", "a price has at most two decimals (cents), "
                                  "not {price}", {"price": repr(price)})
    return price


# Text a store can hold and a person can read: no control or invisible format characters
# (order_services.bodies); a name or id must show something.
Text = Annotated[str, AfterValidator(storable)]
Name = Annotated[str, AfterValidator(storable), AfterValidator(visible)]
Price = Annotated[float, Field(ge=0.01, le=100_000), AfterValidator(_cents)]


class Customer(_Strict):
    id: Name = Field(min_length=1, max_length=64, pattern=r"\S")
    name: Name = Field(min_length=1, max_length=200, pattern=r"\S")
    email: Text | None = Field(default=None, max_length=254,
                               pattern=r"^[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+$")


class Item(_Strict):
    # Odd products, categories and prices stay acceptable: the AI screening holds them for
    # a person. Only what no store (or person) can take is refused here.
    product: Name = Field(min_length=1, max_length=100, pattern=r"\S")
    category: Name = Field(min_length=1, max_length=50, pattern=r"\S")
    quantity: int = Field(ge=1, le=1000)
    price: Price


class Order(_Strict):
    customer: Customer
    items: list[Item] = Field(min_length=1, max_length=100)
    type: Literal["priority", "regular", "digital"]


class CreateRequest(_Strict):
    number_of_orders: int = Field(ge=1, le=1000)


def order_document(order: Order, order_id: str) -> dict[str, Any]:
    """The contract's order document (docs/ORDER_FLOW.md)."""
    items = [item.model_dump() for item in order.items]
    return {
        "order_id": order_id,
        "type": order.type,
        "customer": order.customer.model_dump(exclude_none=True),
        "items": items,
        "total": round(sum(i["quantity"] * i["price"] for i in items), 2),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def amqp_priority(total: float) -> int:
    """1..10, growing with the order's value: ~1 per half decade (10 → 3, 100 → 5, 10k → 9)."""
    return max(1, min(10, 1 + int(2 * math.log10(max(total, 1.0)))))


# -- the broker ----------------------------------------------------------------------------


class PublishFailed(Exception):
    """The broker did not take the order; the message says why, for the client. `certain`:
    the broker cannot have it (not connected before sending, unroutable, refused); else
    (a confirm that timed out, the connection lost after sending) it may have it all the same."""

    def __init__(self, message: str, certain: bool) -> None:
        super().__init__(message)
        self.certain = certain


class AmqpPublisher:
    """Publishes order documents to ORDER_EXCHANGE: one robust connection, one channel with
    publisher confirms; many publishes in flight, each awaiting its own confirm."""

    def __init__(self, connection, channel, exchange, timeout: float = PUBLISH_TIMEOUT) -> None:
        self.connection, self.channel, self.exchange, self.timeout = connection, channel, exchange, timeout

    @classmethod
    async def connect(cls, host: str, port: int, user: str, password: str,
                      exchange: str) -> AmqpPublisher:
        import aio_pika

        connection = await aio_pika.connect_robust(
            host=host, port=port, login=user, password=password, timeout=10,
            reconnect_interval=RECONNECT_INTERVAL,
            client_properties={"connection_name": "order-creator"})
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            # Passive: the topology belongs to opsctl (queues apply); a missing exchange is
            # a setup error, said at start rather than at the first order.
            found = await channel.get_exchange(exchange, ensure=True)
        except Exception:
            await connection.close()
            raise
        return cls(connection, channel, found)

    def healthy(self) -> bool:
        return (not self.connection.is_closed and self.connection.connected.is_set()
                and not self.channel.is_closed)

    async def publish(self, document: dict[str, Any], body: bytes) -> None:
        import aio_pika
        import aiormq
        from aiormq.abc import Basic

        message = aio_pika.Message(
            body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=document["order_id"],
            priority=amqp_priority(document["total"]) if document["type"] == "priority" else None)
        if self.channel.is_closed:
            # Being reopened after a broker restart: each serving process reconnects on its
            # own, so a short wait turns a blip into a slower 201 rather than a 503.
            try:
                await asyncio.wait_for(self.channel.ready(), RECOVERY_WAIT)
            except asyncio.TimeoutError:
                raise PublishFailed("the broker is unreachable (reconnecting)", True) from None
        try:
            confirmation = await self.exchange.publish(
                message, routing_key=document["type"], mandatory=True, timeout=self.timeout)
        except aiormq.exceptions.PublishError:
            raise PublishFailed(f"the broker could not route a {document['type']} order: no queue "
                                f"is bound for it on {self.exchange.name}", True) from None
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishFailed(f"the broker refused the order ({exc.frame.name if exc.frame else exc})",
                                True) from None
        except aiormq.exceptions.ChannelInvalidStateError as exc:  # closed before anything was sent
            raise PublishFailed(f"the broker is unreachable ({exc})", True) from None
        except asyncio.TimeoutError:
            raise PublishFailed(f"the broker did not confirm the order within {self.timeout:g} s",
                                False) from None
        except Exception as exc:  # connection or channel lost, maybe after the message went out
            raise PublishFailed(f"the connection to the broker was lost ({type(exc).__name__})",
                                False) from None
        if not isinstance(confirmation, Basic.Ack):
            raise PublishFailed("the broker did not acknowledge the order", True)

    async def close(self) -> None:
        await self.connection.close()


# -- the catalogue ----------------------------------------------------------------------------


class Catalogue:
    """A copy of the stock service's catalogue, fetched at start and refreshed every 5 min,
    with this service's own client-credentials token (see the stock service's StockAuth)."""

    def __init__(self, stock_url: str, token: Callable[[], str] | None, http=None) -> None:
        self.stock_url, self.token, self.http = stock_url.rstrip("/"), token, http
        self.products: dict[str, list[dict[str, Any]]] = {}
        self.loaded_at: float | None = None
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            token = await asyncio.to_thread(self.token)
            response = await self.http.get(f"{self.stock_url}/stock/all-products-by-category",
                                           headers={"Authorization": f"Bearer {token}"})
            if response.status_code != 200:
                raise RuntimeError(f"stock service answered {response.status_code}: "
                                   f"{response.text[:200]}")
            data = response.json()
            if not isinstance(data, dict) or not all(
                    isinstance(p, list) and all(isinstance(x, dict) and {"product", "price"} <= x.keys()
                                                for x in p) for p in data.values()):
                raise RuntimeError("stock service answered an unexpected catalogue")
            self.products = {c: p for c, p in data.items() if p}
            self.loaded_at = time.monotonic()
            log.info("catalogue loaded: %d categories, %d products", len(self.products),
                     sum(len(p) for p in self.products.values()))

    async def ensure(self) -> dict[str, list[dict[str, Any]]]:
        """The catalogue; fetched now if it never was (the stock service may start later)."""
        if not self.products:
            try:
                await self.refresh()
            except Exception as exc:
                raise HTTPException(503, f"the catalogue is not available yet: the stock service "
                                         f"at {self.stock_url} could not be read ({exc})") from None
        return self.products

    async def run(self) -> None:
        """Forever: refresh every CATALOGUE_REFRESH s; after a failure retry sooner, backing off."""
        delay = CATALOGUE_RETRY[0]
        while True:
            try:
                await self.refresh()
                delay, wait = CATALOGUE_RETRY[0], CATALOGUE_REFRESH
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                wait, delay = delay, min(delay * 2, CATALOGUE_RETRY[1])
                log.warning("catalogue refresh from %s failed (%s); next try in %g s",
                            self.stock_url, exc, wait)
            await asyncio.sleep(wait)


FIRST_NAMES = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Margaret", "Linus",
               "Katherine", "Dennis", "Frances", "Ken", "Radia", "Tim", "Hedy", "John"]
LAST_NAMES = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Hamilton",
              "Torvalds", "Johnson", "Ritchie", "Allen", "Thompson", "Perlman", "Berners-Lee"]


def fake_order(products: dict[str, list[dict[str, Any]]], rng: random.Random) -> Order:
    """A random order like the original prototype's: a random customer, 1..3 catalogue items."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    items = []
    for _ in range(rng.randint(1, 3)):
        category = rng.choice(sorted(products))
        product = rng.choice(products[category])
        items.append({"product": product["product"], "category": category,
                      "quantity": rng.randint(1, 3), "price": float(product["price"])})
    return Order.model_validate({
        "customer": {"id": f"c-{rng.randint(1000, 99999)}", "name": f"{first} {last}",
                     "email": f"{first}.{last}@example.org".lower().replace("-", "")},
        "items": items, "type": rng.choice(["priority", "regular", "digital"])})


# -- the app ----------------------------------------------------------------------------------


def _json(document: Any, status: int = 200, headers: dict[str, str] | None = None,
          raw: bytes | None = None) -> Response:
    return Response(raw if raw is not None else json.dumps(document).encode(), status,
                    headers, media_type="application/json")


class OrderService:
    """What the routes do, over a publisher, a Redis client (redis.asyncio API: get, set,
    delete, ping) and the catalogue; the unit tests give it in-memory fakes."""

    def __init__(self, publisher, redis, catalogue: Catalogue) -> None:
        self.publisher, self.redis, self.catalogue = publisher, redis, catalogue

    async def place(self, order: Order, key: str | None) -> Response:
        order_id = str(uuid.uuid4())
        again = None
        if key is not None:
            again = await self._claim(key, order_id, order)
            if isinstance(again, Response):
                return again
        if again is not None:  # an earlier try's order that the broker may have: the same again
            body, document = again, json.loads(again)
            order_id = document["order_id"]
        else:
            document = order_document(order, order_id)
            body = json.dumps(document).encode()
        try:
            await self.publisher.publish(document, body)
        except PublishFailed as exc:
            ORDERS_REJECTED.labels("broker_unavailable").inc()
            log.warning("order %s not accepted: %s", order_id, exc)
            if key is None:
                return _json({"detail": f"order not accepted, retry later: {exc}"}, 503,
                             {"Retry-After": "1"})
            if exc.certain and not again:
                await self._release(key)  # the broker cannot have it: a retry starts afresh
                return _json({"detail": f"order not accepted, retry later: {exc}"}, 503,
                             {"Retry-After": "1"})
            # The broker may have it: the key stays bound to this order_id, and a retry with
            # it sends this same document again (the consumers store an order_id once).
            await self._unconfirmed(order_id, body)
            return _json({"detail": f"order not confirmed, retry with the same Idempotency-Key "
                                    f"(it sends this same order again, never a second one): {exc}",
                          "order_id": order_id}, 503, {"Retry-After": "1"})
        except BaseException:  # cancelled (shutdown) mid-publish: the broker may have it
            if key is not None:
                asyncio.ensure_future(self._unconfirmed(order_id, body))
            raise
        ORDERS_ACCEPTED.labels(document["type"]).inc()
        await self._cache(order_id, body)
        if again:
            await self._forget_unconfirmed(order_id)
        return _json(None, 201, {"Location": f"/order/{order_id}"}, raw=body)

    async def _claim(self, key: str, order_id: str, order: Order) -> Response | bytes | None:
        """None when this request owns the key now; the body of an earlier try's order that
        was never confirmed (to publish again); else the answer to a repeat."""
        name = f"idempotency:{key}"
        try:
            for _ in range(3):  # the key may expire between SET NX and GET: claim again
                if await self.redis.set(name, order_id, nx=True, ex=IDEMPOTENCY_TTL):
                    return None
                first = await self.redis.get(name)
                if first is not None:
                    break
            else:
                raise RuntimeError("idempotency key kept changing")
            first = first.decode() if isinstance(first, bytes) else first
            cached = await self.redis.get(f"order:{first}")
            unconfirmed = None if cached is not None else await self.redis.get(f"unconfirmed:{first}")
        except Exception as exc:
            ORDERS_REJECTED.labels("idempotency_unavailable").inc()
            log.warning("idempotency store unavailable: %s", exc)
            return _json({"detail": "the idempotency store (Redis) is unavailable; nothing was "
                                    "published, retry later"}, 503, {"Retry-After": "1"})
        if cached is None and unconfirmed is None:
            ORDERS_REJECTED.labels("idempotency_conflict").inc()
            return _json({"detail": "a request with this Idempotency-Key is still in flight "
                                    "(or its order is no longer cached); retry later",
                          "order_id": first}, 409, {"Retry-After": "1"})
        raw = cached if cached is not None else unconfirmed
        raw = raw if isinstance(raw, bytes) else raw.encode()
        document = json.loads(raw)
        asked = {"type": order.type, "customer": order.customer.model_dump(exclude_none=True),
                 "items": [item.model_dump() for item in order.items]}
        if any(document.get(k) != v for k, v in asked.items()):
            ORDERS_REJECTED.labels("idempotency_conflict").inc()
            return _json({"detail": "this Idempotency-Key was used for a different order; "
                                    "use a new key for a new order", "order_id": first}, 422)
        if cached is None:
            return raw
        return _json(None, 201, {"Idempotent-Replayed": "true", "Location": f"/order/{first}"},
                     raw=raw)

    async def _unconfirmed(self, order_id: str, body: bytes) -> None:
        try:
            await self.redis.set(f"unconfirmed:{order_id}", body, ex=IDEMPOTENCY_TTL)
        except Exception as exc:  # the key stays bound all the same: never a second order
            log.warning("order %s unconfirmed and not kept in Redis (a retry with its key gets "
                        "409 until the key expires): %s", order_id, exc)

    async def _forget_unconfirmed(self, order_id: str) -> None:
        try:
            await self.redis.delete(f"unconfirmed:{order_id}")
        except Exception as exc:
            log.warning("could not remove unconfirmed:%s (it expires by itself): %s", order_id, exc)

    async def _release(self, key: str) -> None:
        try:
            await self.redis.delete(f"idempotency:{key}")
        except Exception as exc:
            log.warning("could not release idempotency key (it expires in %d s): %s",
                        IDEMPOTENCY_TTL, exc)

    async def _cache(self, order_id: str, body: bytes) -> None:
        try:
            await self.redis.set(f"order:{order_id}", body, ex=ORDER_CACHE_TTL)
        except Exception as exc:  # the order is accepted all the same
            log.warning("order %s accepted but not cached in Redis: %s", order_id, exc)

    async def create(self, count: int) -> Response:
        products = await self.catalogue.ensure()
        rng = random.Random()
        orders = [fake_order(products, rng) for _ in range(count)]
        limit = asyncio.Semaphore(CREATE_CONCURRENCY)

        async def one(order: Order) -> tuple[bytes | None, str | None]:
            order_id = str(uuid.uuid4())
            document = order_document(order, order_id)
            body = json.dumps(document).encode()
            async with limit:
                try:
                    await self.publisher.publish(document, body)
                except PublishFailed as exc:
                    ORDERS_REJECTED.labels("broker_unavailable").inc()
                    return None, str(exc)
            ORDERS_ACCEPTED.labels(order.type).inc()
            await self._cache(order_id, body)
            return body, None

        results = await asyncio.gather(*(one(o) for o in orders))
        accepted = [body for body, _ in results if body is not None]
        failed = [why for _, why in results if why is not None]
        listing = b"[" + b",".join(accepted) + b"]"
        if failed:
            log.warning("POST /create: %d of %d orders not accepted: %s", len(failed), count, failed[0])
            return _json(None, 503, {"Retry-After": "1"}, raw=(
                b'{"detail":' + json.dumps(f"{len(failed)} of {count} orders not accepted, "
                                           f"retry those: {failed[0]}").encode()
                + b',"orders":' + listing + b"}"))
        return _json(None, 201, raw=b'{"orders":' + listing + b"}")

    async def get(self, order_id: str) -> Response:
        if len(order_id) > 64:
            return _json({"detail": f"unknown order: {order_id[:64]}…"}, 404)
        try:
            cached = await self.redis.get(f"order:{order_id}")
        except Exception as exc:
            log.warning("Redis unavailable for GET /order: %s", exc)
            return _json({"detail": "the order cache (Redis) is unavailable; retry later"}, 503)
        if cached is None:
            return _json({"detail": f"unknown order: {order_id}"}, 404)
        return _json(None, raw=cached if isinstance(cached, bytes) else cached.encode())

    async def healthy(self) -> dict[str, str]:
        problems = {}
        if not self.publisher.healthy():
            problems["rabbitmq"] = "unreachable"
        try:
            await asyncio.wait_for(self.redis.ping(), REDIS_TIMEOUT)
        except Exception:
            problems["redis"] = "unreachable"
        return problems


def _registry() -> CollectorRegistry:
    """The metrics of this process, or of all of them when several serve (WEB_CONCURRENCY)."""
    from prometheus_client import multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return METRICS
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # no Content-Type at all: JSON is the only thing this API takes
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def create_app(service: OrderService,
               authenticate: Callable[[Request], Awaitable[dict]], lifespan=None) -> FastAPI:
    app = FastAPI(title="order-creator", version="1.0", lifespan=lifespan,
                  description="The order API: orders validated, then published to RabbitMQ "
                              "with publisher confirms.")
    add_auth_error_handler(app)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES,
                       refused=lambda: ORDERS_REJECTED.labels("too_large").inc())
    claims_of = Depends(authenticate)  # a default, not Annotated: annotations are strings here

    async def checked_body(request: Request, model: type[BaseModel]) -> BaseModel:
        """Authenticated first, then the body: an anonymous caller learns nothing of it."""
        try:
            await authenticate(request)
        except AuthError as exc:
            ORDERS_REJECTED.labels("unauthorized" if exc.status == 401 else "forbidden").inc()
            raise
        content_type = request.headers.get("content-type")
        if not _is_json(content_type):
            ORDERS_REJECTED.labels("unsupported_media_type").inc()
            raise HTTPException(415, f"the body must be JSON: send Content-Type: application/json "
                                     f"(not {content_type[:100]})")
        body = await request.body()  # BodyLimit answers 413 past MAX_BODY_BYTES
        try:
            return parse_body(model, body)
        except RequestValidationError:
            ORDERS_REJECTED.labels("invalid").inc()
            raise

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        problems = await service.healthy()
        if problems:
            return JSONResponse({"status": "unavailable", **problems}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)

    @app.post("/orders", status_code=201, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": Order.model_json_schema()}}}})
    async def place_order(request: Request) -> Response:
        """One order; 201 with its document once the broker confirmed it."""
        started = time.perf_counter()
        try:
            keys = request.headers.getlist("idempotency-key")
            order = await checked_body(request, Order)
            if len(keys) > 1:  # which one would count? Neither: say so
                ORDERS_REJECTED.labels("invalid").inc()
                raise HTTPException(400, f"{len(keys)} Idempotency-Key headers: send one")
            key = keys[0] if keys else None
            if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
                ORDERS_REJECTED.labels("invalid").inc()
                raise RequestValidationError([{
                    "type": "string_pattern_mismatch", "loc": ("header", "idempotency-key"),
                    "msg": "Idempotency-Key must be 1 to 200 visible ASCII characters",
                    "input": key[:200]}])
            return await service.place(order, key)
        finally:
            ORDER_SECONDS.observe(time.perf_counter() - started)

    @app.post("/create", status_code=201, openapi_extra={"requestBody": {
        "required": True,
        "content": {"application/json": {"schema": CreateRequest.model_json_schema()}}}})
    async def create(request: Request) -> Response:
        """{"number_of_orders": N}: N random orders from the catalogue, each published."""
        body = await checked_body(request, CreateRequest)
        return await service.create(body.number_of_orders)

    @app.get("/order/{order_id}")
    async def get_order(order_id: str, claims: dict = claims_of) -> Response:
        return await service.get(order_id)

    @app.get("/all-products-by-category")
    async def all_products_by_category(claims: dict = claims_of) -> dict:
        return await service.catalogue.ensure()

    return app


# -- running ----------------------------------------------------------------------------------


class StartupError(RuntimeError):
    """A store is unreachable or refuses: the message says which, and what to do."""


def _settings() -> dict[str, Any]:
    settings = Env()
    env: dict[str, Any] = settings.require(
        "HTTP_HOST", "HTTP_PORT", "RABBITMQ_HOST", "RABBITMQ_PORT", "ORDER_EXCHANGE", "REDIS_HOST",
        "REDIS_PORT", "STOCK_URL", "OIDC_TOKEN_URL", "OIDC_CLIENT_ID", "OIDC_CLIENT_SECRET")
    for name in ("HTTP_PORT", "RABBITMQ_PORT", "REDIS_PORT"):
        env[name] = settings.port(name)
    # Serving processes: one Python process tops out near one core (see the module's header).
    env["WEB_CONCURRENCY"] = settings.number("WEB_CONCURRENCY", 1, 64, default=min(2, os.cpu_count() or 1))
    return env


async def open_stores(env: dict[str, Any], vault: VaultSecrets) -> tuple[AmqpPublisher, Any]:
    """The broker and the cache, connected with the credentials read from Vault."""
    import redis.asyncio as aioredis

    try:
        secrets = await asyncio.to_thread(vault.read)
        credentials = {k: secrets[k] for k in ("rabbitmq_username", "rabbitmq_password",
                                               "redis_username", "redis_password")}
    except KeyError as exc:
        raise StartupError(f"Vault path {vault.path} has no {exc} (run: opsctl vault apply)") from None
    except Exception as exc:
        raise StartupError(f"reading the credentials from Vault at {vault.client.url} failed: "
                           f"{exc}") from None
    try:
        publisher = await AmqpPublisher.connect(
            env["RABBITMQ_HOST"], env["RABBITMQ_PORT"], credentials["rabbitmq_username"],
            credentials["rabbitmq_password"], env["ORDER_EXCHANGE"])
    except Exception as exc:
        hint = (" (create the topology: opsctl queues apply)"
                if "NOT_FOUND" in str(exc) or "not found" in str(exc).lower() else "")
        raise StartupError(f"RabbitMQ at {env['RABBITMQ_HOST']}:{env['RABBITMQ_PORT']}, exchange "
                           f"{env['ORDER_EXCHANGE']}: {exc or type(exc).__name__}{hint}") from None
    redis = aioredis.Redis(host=env["REDIS_HOST"], port=env["REDIS_PORT"],
                           username=credentials["redis_username"],
                           password=credentials["redis_password"], socket_timeout=REDIS_TIMEOUT,
                           socket_connect_timeout=REDIS_TIMEOUT, health_check_interval=30)
    try:
        await redis.ping()
    except Exception as exc:
        await publisher.close()
        await redis.aclose()
        raise StartupError(f"Redis at {env['REDIS_HOST']}:{env['REDIS_PORT']}: {exc}") from None
    return publisher, redis


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def build_app() -> FastAPI:
    """The app of one serving process (uvicorn's factory): it connects in its lifespan."""
    import httpx
    from prometheus_client import disable_created_metrics

    configure_logging()
    disable_created_metrics()
    env = _settings()
    validator = JWTValidator.from_env()
    vault = VaultSecrets.from_env()
    catalogue = Catalogue(env["STOCK_URL"], KeycloakToken(
        env["OIDC_TOKEN_URL"], env["OIDC_CLIENT_ID"], env["OIDC_CLIENT_SECRET"]))
    service = OrderService(None, None, catalogue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.publisher, service.redis = await open_stores(env, vault)
        catalogue.http = httpx.AsyncClient(timeout=5)
        refresher = asyncio.create_task(catalogue.run(), name="catalogue")
        log.info("process %d serving: exchange %s at %s:%s, Redis %s:%s, stock service %s",
                 os.getpid(), env["ORDER_EXCHANGE"], env["RABBITMQ_HOST"], env["RABBITMQ_PORT"],
                 env["REDIS_HOST"], env["REDIS_PORT"], env["STOCK_URL"])
        try:
            yield
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)
            await catalogue.http.aclose()
            await service.redis.aclose()
            await service.publisher.close()

    return create_app(service, require_token(validator), lifespan)


async def preflight(env: dict[str, Any], vault: VaultSecrets) -> None:
    """Connect to every store once before serving, so that a bad setting or an unreachable
    store ends the start with one clear line (and a non-zero exit), not a worker's traceback."""
    publisher, redis = await open_stores(env, vault)
    await redis.aclose()
    await publisher.close()


def main() -> None:
    """Serve on HTTP_HOST:HTTP_PORT with WEB_CONCURRENCY processes (default: 2, or 1 on a
    one-core machine); each connects to the broker and the cache itself, and /metrics adds
    up all of them."""
    import shutil
    import tempfile

    import uvicorn

    configure_logging()
    try:
        env = _settings()
        limits = server_limits()
        JWTValidator.from_env()
        vault = VaultSecrets.from_env()
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    try:
        asyncio.run(preflight(env, vault))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)
    workers, metrics_dir = env["WEB_CONCURRENCY"], None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus_client's multiprocess mode: each process writes its samples here, and
        # /metrics adds them up. Set before the workers start (they import it fresh).
        metrics_dir = tempfile.mkdtemp(prefix="order-creator-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    log.info("order-creator on http://%s:%s (%d process%s)", env["HTTP_HOST"], env["HTTP_PORT"],
             workers, "es" if workers > 1 else "")
    try:
        uvicorn.run("order_services.order_creator:build_app", factory=True, host=env["HTTP_HOST"],
                    port=env["HTTP_PORT"], workers=workers, log_config=None, access_log=False,
                    server_header=False, backlog=4096, http="order_services.bodies:IdleBoundedHttp",
                    **limits)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
