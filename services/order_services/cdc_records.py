"""The CDC bridge's Kafka record of an order document, and its resume state on disk (see
order_services.cdc_bridge for the guarantees)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from order_services.files import write_atomic

log = logging.getLogger("order_services.cdc_bridge")

STATE_FILE = "resume-token.json"


# --- the record -------------------------------------------------------------------------
def jsonable(value: Any):
    """json.dumps default: BSON and Python types as JSON (dates as ISO-8601 strings)."""
    from bson import Decimal128, ObjectId, Timestamp
    from bson.binary import Binary

    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)  # BSON dates are UTC
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, Decimal128):
        return float(value.to_decimal())
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (ObjectId, uuid.UUID)):
        return str(value)
    if isinstance(value, Timestamp):
        return {"t": value.time, "i": value.inc}
    if isinstance(value, (Binary, bytes)):
        return bytes(value).hex()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def record(document: dict) -> tuple[bytes, bytes]:
    """(key, value) of the Kafka record of one stored order document."""
    key = document.get("order_id", document["_id"])
    return (str(jsonable(key) if not isinstance(key, str) else key).encode(),
            json.dumps(document, default=jsonable, separators=(",", ":")).encode())


# --- the resume state -------------------------------------------------------------------
class State:
    """STATE_DIR/resume-token.json: {kind, token, cluster_time: {t, i}, document_id, saved_at}.

    kind "event": the token of the last published event, its clusterTime and its document's
    _id. kind "position": the stream's position after a re-scan (no event), the server's
    cluster time then, and the _id of the last document scanned."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / STATE_FILE

    def load(self) -> dict | None:
        from bson import json_util

        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            state = json_util.loads(text)
            if not isinstance(state.get("token"), dict) or "document_id" not in state:
                raise ValueError("no token or document_id")
            return state
        except Exception as e:
            log.warning("ignoring unreadable %s (%s): the collection will be re-scanned",
                        self.path, e)
            return None

    def save(self, kind: str, token: dict, cluster_time, document_id) -> None:
        from bson import json_util

        body = json_util.dumps({
            "kind": kind, "token": token,
            "cluster_time": {"t": cluster_time.time, "i": cluster_time.inc} if cluster_time else None,
            "document_id": document_id,
            "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        })
        write_atomic(self.path, body)
