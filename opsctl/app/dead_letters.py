"""The order flow's dead letters (queue orders-dead-letter): list, show, redrive, drop.

A consumer dead-letters a message it can never store with headers that say why
(x-dead-letter-reason), where it came from (x-dead-letter-queue, x-dead-letter-routing-key)
and when (x-dead-lettered-at); a message RabbitMQ dead-lettered by itself carries x-death
instead. RabbitMQ cannot browse a queue: the messages are taken with manual
acknowledgement, and every one not acted on is given back (nack, requeue) before the
channel closes. A letter's id is its message_id (the order_id, as order-creator sends it),
else the order_id of its body, else `sha256:` and the start of its body's hash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from opsctl.errors import OpsError, UsageError

SCAN_LIMIT = 10_000  # messages held unacknowledged at most while looking
OUR_HEADERS = ("x-dead-letter-reason", "x-dead-letter-queue", "x-dead-letter-routing-key",
               "x-dead-lettered-at", "x-dead-lettered-by", "x-death", "x-attempts",
               "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
               "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason")


def _plain(value: Any) -> Any:
    """An AMQP header value as JSON can show it."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class Letter:
    tag: int
    properties: Any
    body: bytes
    headers: dict = field(default_factory=dict)
    document: Any = None

    @classmethod
    def of(cls, tag: int, properties, body: bytes) -> Letter:
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        return cls(tag, properties, body, _plain(properties.headers or {}), document)

    @property
    def order_id(self) -> str | None:
        found = self.document.get("order_id") if isinstance(self.document, dict) else None
        return found if isinstance(found, str) else None

    @property
    def id(self) -> str:
        return (self.properties.message_id or self.order_id
                or "sha256:" + hashlib.sha256(self.body).hexdigest()[:12])

    def _death(self) -> dict:
        deaths = self.headers.get("x-death")
        return deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}

    @property
    def queue(self) -> str:
        return self.headers.get("x-dead-letter-queue") or self._death().get("queue") or ""

    @property
    def reason(self) -> str:
        if self.headers.get("x-dead-letter-reason"):
            return self.headers["x-dead-letter-reason"]
        death = self._death().get("reason")
        return f"{death} by RabbitMQ (no reason recorded)" if death else "unknown"

    @property
    def when(self) -> str:
        return str(self.headers.get("x-dead-lettered-at") or self._death().get("time") or "")

    @property
    def routing_key(self) -> str:
        if self.headers.get("x-dead-letter-routing-key"):
            return self.headers["x-dead-letter-routing-key"]
        keys = self._death().get("routing-keys")
        if isinstance(keys, list) and keys:
            return keys[0]
        return self.document.get("type", "") if isinstance(self.document, dict) else ""

    @property
    def type(self) -> str:
        found = self.document.get("type") if isinstance(self.document, dict) else None
        return found if isinstance(found, str) else ""

    def summary(self) -> dict:
        return {"id": self.id, "order_id": self.order_id, "type": self.type, "queue": self.queue,
                "reason": self.reason, "dead_lettered_at": self.when,
                "routing_key": self.routing_key}

    def full(self) -> dict:
        p = self.properties
        properties = {name: _plain(getattr(p, name)) for name in (
            "message_id", "content_type", "content_encoding", "delivery_mode", "priority",
            "correlation_id", "timestamp", "type", "app_id") if getattr(p, name) is not None}
        body = self.document if self.document is not None else self.body.decode("utf-8", "replace")
        return {**self.summary(), "properties": properties, "headers": self.headers,
                "body": body}


class DeadLetterQueue:
    """The dead-letter queue over one admin connection: `take()` holds its messages
    unacknowledged; on leaving, every one not acknowledged is given back."""

    def __init__(self, ctx) -> None:
        from opsctl.components import build

        self.ctx = ctx
        self.names = ctx.spec.names
        self.queue = self.names.queues.dead_letter
        self.server = build("rabbitmq", ctx)
        self.connection = self.channel = None
        self.letters: list[Letter] = []
        self.more = False

    def __enter__(self) -> DeadLetterQueue:
        import pika

        try:
            self.connection = pika.BlockingConnection(self.server.connection_parameters(
                connection_attempts=2, retry_delay=1, socket_timeout=5,
                client_properties={"connection_name": "opsctl dead-letters"}))
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
        except Exception as e:  # pika's errors, OSError
            self.close()
            raise OpsError(f"RabbitMQ at {self.server.address('amqp')} is not "
                           f"reachable: {type(e).__name__}: {e}",
                           "is the platform running? opsctl status") from None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        connection, channel = self.connection, self.channel
        self.connection = self.channel = None
        if connection is None or not connection.is_open:
            return
        try:
            if channel is not None and channel.is_open and self.letters:
                # Every one not acknowledged goes back, in its place (closing would too).
                channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            connection.close()
        except Exception:
            pass

    def take(self, limit: int = SCAN_LIMIT) -> list[Letter]:
        import pika.exceptions

        try:
            count = self.channel.queue_declare(self.queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as e:
            raise OpsError(f"queue {self.queue} does not exist ({e.reply_text})",
                           "create the topology: opsctl queues apply") from None
        for _ in range(min(count, limit)):
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=False)
            if method is None:
                break
            self.letters.append(Letter.of(method.delivery_tag, properties, body))
        self.more = count > limit
        return self.letters

    def chosen(self, ids: list[str]) -> list[Letter]:
        """Every letter with one of these ids (a message dead-lettered twice: both), or a
        UsageError naming the ids not found (then nothing is done)."""
        found = [letter for letter in self.letters if letter.id in ids]
        unknown = [i for i in dict.fromkeys(ids) if i not in {letter.id for letter in found}]
        if unknown:
            raise UsageError(f"no dead letter with id {', '.join(unknown)} in {self.queue}"
                             f"{' (only the first ' + str(SCAN_LIMIT) + ' were read)' if self.more else ''}; "
                             "nothing was done", "list them: opsctl orders dead-letters list")
        return found

    def settle(self, letter: Letter) -> None:
        self.channel.basic_ack(letter.tag)
        self.letters.remove(letter)

    def republish(self, letter: Letter) -> None:
        """To order-exchange with its original routing key, confirmed; without the
        dead-letter headers (so it gets its tries afresh)."""
        import pika
        import pika.exceptions

        if not letter.routing_key:
            raise OpsError(f"dead letter {letter.id} has no routing key (no type) to redrive with",
                           f"drop it: opsctl orders dead-letters drop {letter.id}")
        p = letter.properties
        headers = {k: v for k, v in (p.headers or {}).items() if k not in OUR_HEADERS}
        props = pika.BasicProperties(
            content_type=p.content_type, content_encoding=p.content_encoding,
            headers=headers or None, delivery_mode=p.delivery_mode or 2, priority=p.priority,
            correlation_id=p.correlation_id, message_id=p.message_id, timestamp=p.timestamp,
            type=p.type, app_id=p.app_id)
        try:
            self.channel.basic_publish(self.names.exchanges.orders, letter.routing_key,
                                       letter.body, props, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
            raise OpsError(f"{self.names.exchanges.orders} did not take dead letter {letter.id} "
                           f"(routing key {letter.routing_key!r}): {type(e).__name__}; it stays "
                           "in the dead-letter queue",
                           "check the topology: opsctl queues diff") from None


def _redis(ctx):
    import redis

    where = ctx.address("redis", "redis")
    return redis.Redis(host=where.host, port=where.port,
                       password=ctx.secret("redis", "password"), socket_timeout=2,
                       socket_connect_timeout=2)


def _restore_cache(ctx, letters: list[Letter]) -> str:
    """order:<id> back to the plain document (no dead-lettered status) for redriven orders;
    "" or why not (Redis is a cache: a failure is reported, not fatal)."""
    documents = [letter.document for letter in letters if letter.order_id]
    if not documents:
        return ""
    try:
        client = _redis(ctx)
        for document in documents:
            client.set(f"order:{document['order_id']}", json.dumps(document), ex=7 * 86400)
        return ""
    except Exception as e:
        return f"the order cache (Redis) was not updated: {type(e).__name__}: {e}"


# --- what the commands call -------------------------------------------------------------------


def list_letters(ctx, limit: int = SCAN_LIMIT) -> dict:
    with DeadLetterQueue(ctx) as dlq:
        letters = dlq.take(limit)
        return {"queue": dlq.queue, "count": len(letters), "more": dlq.more,
                "letters": [letter.summary() for letter in letters]}


def show(ctx, letter_id: str) -> list[dict]:
    with DeadLetterQueue(ctx) as dlq:
        dlq.take()
        return [letter.full() for letter in dlq.chosen([letter_id])]


def redrive(ctx, ids: list[str]) -> dict:
    with DeadLetterQueue(ctx) as dlq:
        dlq.take()
        done = []
        for letter in dlq.chosen(ids):
            dlq.republish(letter)  # confirmed by the broker first,
            dlq.settle(letter)     # only then off the dead-letter queue
            done.append(letter)
        return {"redriven": [letter.summary() for letter in done],
                "warning": _restore_cache(ctx, done)}


def drop(ctx, ids: list[str]) -> dict:
    with DeadLetterQueue(ctx) as dlq:
        dlq.take()
        letters = dlq.chosen(ids)
        for letter in letters:
            dlq.settle(letter)
        return {"dropped": [letter.summary() for letter in letters]}
