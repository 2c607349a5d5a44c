"""The consumers' stores: PostgreSQL and MongoDB, written idempotently by order_id and
durably before a message is acknowledged, and the order's Redis entry a dead letter marks
(see order_services.consumer for the delivery rules)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import TYPE_CHECKING

from order_services.worker import Unavailable

if TYPE_CHECKING:
    from order_services.consumer import Credentials, Settings

log = logging.getLogger("order_services.consumer")

REDIS_TIMEOUT = 1.0               # seconds; the dead-letter mark must not hold the queue up
REDIS_PAUSE = 30.0                # seconds Redis is left alone after it failed
ORDER_CACHE_TTL = 7 * 86400       # as the order creator's order:<id>
# MongoDB write errors that say nothing about the data: a concurrent upsert of the same
# _id (11000), a write conflict (112), a time limit (50), or the server shutting down or
# stepping down mid-write.
MONGO_PASSING = {11000, 112, 50, 91, 189, 10107, 11600, 11602, 13435, 13436}
TABLE = "priority_orders"


class StoreUnavailable(Unavailable):
    """The store cannot be reached (or did not confirm durability): retry the batch later."""


class StoreRefused(Exception):
    """The store refused the write of these documents. `permanent`: because of the data
    (it never will take it: dead-letter at once); else for a passing reason (retried)."""

    def __init__(self, message: str, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def one_line(error: BaseException) -> str:
    """An error as one short line: its type and first line (PostgreSQL adds the context of
    the failing statement, order data included, on the next lines)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else repr(error)}"[:300]


class PostgresStore:
    """orders.priority_orders: one row per order_id, committed before the acknowledgement."""

    DDL = (f"CREATE TABLE IF NOT EXISTS {TABLE} (order_id text PRIMARY KEY, "
           "document jsonb NOT NULL, received_at timestamptz NOT NULL DEFAULT now())")

    def __init__(self, settings: Settings, credentials: Credentials):
        self.settings, self.credentials = settings, credentials
        self.conn = None

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def describe(self) -> str:
        pg = self.settings.postgres
        return f"PostgreSQL {pg['host']}:{pg['port']}/{pg['dbname']} table {TABLE}"

    def connect(self) -> None:
        import psycopg

        self.close()
        pg = self.settings.postgres
        refresh = False
        for _ in range(2):
            user, password = self.credentials.get("postgres", refresh=refresh)
            try:
                conn = psycopg.connect(host=pg["host"], port=pg["port"], dbname=pg["dbname"],
                                       user=user, password=password, connect_timeout=5,
                                       application_name=self.settings.service,
                                       options="-c statement_timeout=30000")  # never hang
                break
            except psycopg.OperationalError as e:
                if "password authentication failed" in str(e) and not refresh:
                    refresh = True  # rotated in Vault: read it again, once
                    continue
                raise StoreUnavailable(f"cannot connect to {self.describe()}: "
                                       f"{one_line(e)}") from e
        else:
            raise StoreUnavailable(f"{self.describe()} refuses this service's credentials")
        try:
            with conn.transaction():
                conn.execute(self.DDL)
        except psycopg.errors.UniqueViolation:
            pass  # another consumer created it at the same moment
        except psycopg.Error as e:
            conn.close()
            raise StoreUnavailable(f"cannot create table {TABLE}: {one_line(e)}") from e
        self.conn = conn

    def write(self, documents: list[dict]) -> list[bool]:
        """Insert every document in one transaction; True where the row is new."""
        import psycopg
        from psycopg.types.json import Jsonb

        if not self.connected:
            self.connect()
        values = ", ".join(["(%s, %s)"] * len(documents))
        params: list = []
        for document in documents:
            params += [document["order_id"], Jsonb(document)]
        try:
            with self.conn.transaction():
                rows = self.conn.execute(
                    f"INSERT INTO {TABLE} (order_id, document) VALUES {values} "
                    "ON CONFLICT (order_id) DO NOTHING RETURNING order_id", params).fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            self.close()
            raise StoreUnavailable(f"{self.describe()}: {one_line(e)}") from e
        except psycopg.Error as e:
            if self.conn.closed or self.conn.broken:
                self.close()
                raise StoreUnavailable(f"{self.describe()}: {one_line(e)}") from e
            # Class 22 (data exception: \u0000 in jsonb, a bad number) and 23 (integrity) are
            # about the data; anything else (a permission, a trigger) may pass. (Serialization
            # failures and deadlocks are OperationalErrors: held above, as an outage.)
            raise StoreRefused(one_line(e), isinstance(
                e, (psycopg.errors.DataError, psycopg.errors.IntegrityError))) from e
        inserted = {row[0] for row in rows}
        result = []
        for document in documents:
            new = document["order_id"] in inserted
            inserted.discard(document["order_id"])  # a second copy in the batch is a duplicate
            result.append(new)
        return result

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None


class MongoStore:
    """One document per order_id (_id), written with {w: majority, j: true}."""

    def __init__(self, settings: Settings, credentials: Credentials):
        self.settings, self.credentials = settings, credentials
        self.client = self.collection = None

    @property
    def connected(self) -> bool:
        return self.collection is not None

    def describe(self) -> str:
        m = self.settings.mongodb
        return f"MongoDB {m['db']}.{m['collection']}"

    def connect(self) -> None:
        from pymongo import MongoClient, WriteConcern
        from pymongo.errors import OperationFailure, PyMongoError

        self.close()
        m = self.settings.mongodb
        refresh = False
        for _ in range(2):
            user, password = self.credentials.get("mongodb", refresh=refresh)
            # No retryable writes: an upsert by order_id is safe to redo anyway (a failed batch
            # is requeued), and SecantusDB scans its whole record of them on every write.
            client = MongoClient(m["url"], username=user, password=password, authSource=m["db"],
                                 tz_aware=True, serverSelectionTimeoutMS=5000,
                                 connectTimeoutMS=5000, socketTimeoutMS=30000,
                                 appname=self.settings.service, retryWrites=False)
            try:
                client[m["db"]].command("ping")
                break
            except OperationFailure as e:
                client.close()
                if e.code == 18 and not refresh:  # AuthenticationFailed: rotated in Vault?
                    refresh = True
                    continue
                raise StoreUnavailable(f"{self.describe()}: {one_line(e)}") from e
            except PyMongoError as e:
                client.close()
                raise StoreUnavailable(f"cannot connect to {self.describe()}: "
                                       f"{one_line(e)}") from e
        else:
            raise StoreUnavailable(f"{self.describe()} refuses this service's credentials")
        self.client = client
        self.collection = client[m["db"]].get_collection(
            m["collection"], write_concern=WriteConcern("majority", j=True))

    def write(self, documents: list[dict]) -> list[bool]:
        from pymongo import UpdateOne
        from pymongo.errors import (BulkWriteError, ConnectionFailure, ExecutionTimeout,
                                    InvalidDocument, OperationFailure, PyMongoError,
                                    WTimeoutError)

        if not self.connected:
            self.connect()
        now = dt.datetime.now(dt.timezone.utc)
        operations = [UpdateOne({"_id": d["order_id"]},
                                {"$setOnInsert": {**{k: v for k, v in d.items() if k != "_id"},
                                                  "received_at": now}}, upsert=True)
                      for d in documents]
        try:
            result = self.collection.bulk_write(operations, ordered=True)
            upserted = set(result.upserted_ids)
        except BulkWriteError as e:
            details = e.details or {}
            if details.get("writeConcernErrors"):
                raise StoreUnavailable(f"{self.describe()}: durability not confirmed: "
                                       f"{details['writeConcernErrors'][0].get('errmsg')}") from e
            error = (details.get("writeErrors") or [{}])[0]
            raise StoreRefused(f"{self.describe()}: {error.get('errmsg', e)}",
                               error.get("code") not in MONGO_PASSING) from e
        except (ConnectionFailure, WTimeoutError, ExecutionTimeout) as e:
            self.close()
            raise StoreUnavailable(f"{self.describe()}: {one_line(e)}") from e
        except InvalidDocument as e:  # refused by the driver itself: it can never be written
            raise StoreRefused(one_line(e), True) from e
        except OperationFailure as e:
            if e.code in (13, 18):  # unauthorised
                self.close()
                raise StoreUnavailable(f"{self.describe()}: {one_line(e)}") from e
            raise StoreRefused(one_line(e), False) from e
        except PyMongoError as e:
            self.close()
            raise StoreUnavailable(f"{self.describe()}: {one_line(e)}") from e
        return [index in upserted for index in range(len(documents))]

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
        self.client = self.collection = None


class OrderStatus:
    """The order's entry in Redis (order:<order_id>, which GET /order/{id} answers), marked
    dead-lettered. Best effort: Redis down, or no Redis credentials, never holds the queue up."""

    def __init__(self, settings: Settings, credentials: Credentials):
        self.settings, self.credentials = settings, credentials
        self.client = None
        self.paused_until = 0.0

    def dead_lettered(self, document: dict, reason: str, at: str) -> None:
        order_id = document["order_id"]
        if not self.settings.redis.get("host") or time.monotonic() < self.paused_until:
            log.warning("order %s dead-lettered; its Redis entry is not marked (Redis %s)",
                        order_id, "not configured" if not self.settings.redis.get("host")
                        else "failed recently")
            return
        entry = {**document, "status": "dead-lettered", "dead_letter_reason": reason,
                 "dead_lettered_at": at}
        try:
            if self.client is None:
                import redis

                user, password = self.credentials.get("redis")
                self.client = redis.Redis(
                    host=self.settings.redis["host"], port=int(self.settings.redis["port"]),
                    username=user, password=password, socket_timeout=REDIS_TIMEOUT,
                    socket_connect_timeout=REDIS_TIMEOUT)
            self.client.set(f"order:{order_id}", json.dumps(entry), ex=ORDER_CACHE_TTL)
        except Exception as e:  # Redis down, refusing, or no credentials in Vault
            self.paused_until = time.monotonic() + REDIS_PAUSE
            self.client = None
            log.warning("order %s dead-lettered, but its Redis entry could not be marked (%s); "
                        "Redis is left alone for %.0fs", order_id, one_line(e), REDIS_PAUSE)
