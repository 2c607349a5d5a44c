"""The order API's routes over a publisher, a Redis cache and the catalogue (see
order_services.order_creator for the contract and how it runs)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

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
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from order_services.auth import AuthError, add_auth_error_handler
from order_services.bodies import MAX_BODY_BYTES, BodyLimit, parse_body
from order_services.catalogue import Catalogue
from order_services.order_model import CreateRequest, Order, fake_order, order_document
from order_services.publisher import PublishFailed

log = logging.getLogger("order_creator")

IDEMPOTENCY_TTL = 86400          # seconds a key is remembered (contract: idempotency:<key>)
ORDER_CACHE_TTL = 7 * 86400      # seconds order:<id> is kept; longer than IDEMPOTENCY_TTL
REDIS_TIMEOUT = 2.0              # seconds for any Redis call
CREATE_CONCURRENCY = 64          # publishes in flight for one POST /create
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII, as HTTP headers carry it

# A registry of this module's own (not prometheus_client's global one): with several serving
# processes, /metrics adds up their samples instead (_registry).
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
