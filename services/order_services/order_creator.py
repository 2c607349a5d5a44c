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
import logging
import os
import sys
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from order_services.auth import JWTValidator, require_token
from order_services.bodies import server_limits
from order_services.catalogue import Catalogue
from order_services.order_api import REDIS_TIMEOUT, OrderService, create_app
from order_services.publisher import AmqpPublisher
from order_services.secrets import KeycloakToken, VaultSecrets
from order_services.settings import ConfigError, Env

log = logging.getLogger("order_creator")


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
