"""Orders in and out of the platform: simulated traffic through the edge, and the stored
regular orders as a JSON-lines file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from opsctl.app import Result
from opsctl.components import build, keycloak_realm
from opsctl.components.nginx import edge_url
from opsctl.context import Context
from opsctl.errors import FAILED, OpsError, UsageError
from opsctl.files import write_atomic


class TokenSource:
    """The people client's token, renewed 30 s before it expires."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.client = ctx.spec.names.keycloak.client
        self.secret = keycloak_realm.client_secret(ctx, self.client)
        self.token, self.expires = "", 0.0

    def __call__(self) -> str:
        if time.monotonic() >= self.expires:
            answer = keycloak_realm.client_credentials(self.ctx, self.client, self.secret)
            self.token = answer["access_token"]
            self.expires = time.monotonic() + answer.get("expires_in", 60) - 30
        return self.token


def simulate(ctx: Context, rate: float, duration: float, anomaly_rate: float, concurrency: int,
             seed: int | None, tick: Callable) -> Result:
    """Authenticated orders at a steady rate through the edge, as clients send them; `tick`
    sees the running result. Exit 1 if any order was not accepted."""
    import asyncio

    from opsctl.orders import OrderGenerator, run_load

    url = f"{edge_url(ctx)}/orders"
    tokens = TokenSource(ctx)
    tokens()  # fail early, clearly, if Keycloak or Vault is not there
    generator = OrderGenerator(ctx.spec.catalogue.products, anomaly_rate, seed)
    try:
        result = asyncio.run(run_load(url, tokens, generator, rate, duration, concurrency, tick))
    except OSError as e:
        raise OpsError(f"the edge of the order API is not reachable at {url}: {e}",
                       "start it and the API: opsctl install --only nginx; "
                       "opsctl services start order-creator")
    return Result({"url": url, **result.summary()}, 0 if result.accepted == result.sent else FAILED)


def generate(ctx: Context, count: int, anomaly_rate: float, seed: int, rate: float, out: Path) -> Result:
    """Labelled orders (as stored, with created_at and a `label`) for training offline."""
    from collections import Counter

    from opsctl.orders import labelled

    orders = labelled(ctx.spec.catalogue.products, count, anomaly_rate, seed, rate)
    write_atomic(out, "".join(json.dumps(o) + "\n" for o in orders))
    return Result({"out": str(out), "orders": count, "labels": dict(Counter(o["label"] for o in orders))})


def export_orders(ctx: Context, dest: Path) -> int:
    """ecommerce.orders (as the CDC bridge sees them) into a JSON-lines file. An order the
    screening holds for validation carries `label: held`, so that training leaves it out
    (it still counts in its customer's history)."""
    names = ctx.spec.names.mongodb
    try:
        with build("mongodb", ctx).client() as client:
            docs = list(client[names.database][names.orders].find())
    except Exception as e:  # pymongo's errors: the server is not there
        raise OpsError(f"cannot read {names.database}.{names.orders} from MongoDB: {e}",
                       "is the platform running? opsctl status") from None
    if not docs:
        raise UsageError(f"{names.database}.{names.orders} holds no orders to train on",
                         "send some first (opsctl orders simulate), or train --from a file")
    for doc in docs:
        if (doc.pop("validation", None) or {}).get("status") == "held":
            doc["label"] = "held"
    write_atomic(dest, "".join(json.dumps(d, default=str) + "\n" for d in docs))
    return len(docs)
