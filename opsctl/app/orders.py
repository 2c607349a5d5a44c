"""Orders out of the platform: the stored regular orders as a JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path

from opsctl.components import build
from opsctl.context import Context
from opsctl.errors import OpsError, UsageError
from opsctl.files import write_atomic


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
