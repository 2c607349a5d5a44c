"""The RabbitMQ topology of the order flow, reconciled from the spec with pika.

order-exchange (direct) ─priority→ priority-orders (x-max-priority)
                        ─regular──→ regular-orders
                        ─digital──→ digital-order-exchange (fanout) → digital-orders
                        ─validation→ orders-validation
Every order queue dead-letters to orders-dlx (fanout) → orders-dead-letter.

The live state is read from the management API (it shows a queue's arguments, which a
passive declare does not); changes are made with pika. A queue whose arguments differ is
never changed behind the user's back: `--recreate` replaces it when it is empty, and
`--force` also when it holds messages.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Iterator

from opsctl import httpclient
from opsctl.components import build
from opsctl.components.base import Change, ConfigStep
from opsctl.errors import OpsError


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Binding:
    source: str
    destination: str
    kind: str  # "q" (queue) or "e" (exchange), as in the management API's paths
    routing_key: str


VALIDATION_KEY = "validation"  # the routing key of orders held for a person (order-screening)


def desired(spec) -> tuple[list[Exchange], list[Queue], list[Binding]]:
    ex, q, settings = spec.names.exchanges, spec.names.queues, spec.rabbitmq
    dead_letter = {"x-dead-letter-exchange": ex.dead_letter}
    exchanges = [Exchange(ex.orders, "direct"), Exchange(ex.digital, "fanout"),
                 Exchange(ex.dead_letter, "fanout")]
    queues = [
        Queue(q.priority, {**dead_letter, "x-max-priority": settings.max_priority}),
        Queue(q.regular, dead_letter),
        Queue(q.digital, dead_letter),
        Queue(q.validation, dead_letter),
        Queue(q.dead_letter),
    ]
    bindings = [
        Binding(ex.orders, q.priority, "q", "priority"),
        Binding(ex.orders, q.regular, "q", "regular"),
        Binding(ex.orders, ex.digital, "e", "digital"),
        Binding(ex.digital, q.digital, "q", ""),
        Binding(ex.orders, q.validation, "q", VALIDATION_KEY),
        Binding(ex.dead_letter, q.dead_letter, "q", ""),
    ]
    return exchanges, queues, bindings


class RabbitMQTopology(ConfigStep):
    after = ("rabbitmq",)
    on_kubernetes = True  # through a port-forward to the broker's pod (ctx.reach)

    def __init__(self, name, ctx, recreate: bool = False, force: bool = False):
        super().__init__(name, ctx)
        self.server = build("rabbitmq", ctx)
        self.recreate, self.force = recreate, force
        self._channel = None

    # --- reading: the management API ------------------------------------------------
    def api(self, path: str):
        """GET /api/<path>, or None for 404."""
        try:
            return self.server.api(path, timeout=5)
        except httpclient.HTTPError as e:
            if e.status == 404:
                return None
            raise
        except OSError as e:
            raise OpsError(f"RabbitMQ's management API is not reachable: {e}",
                           f"run: {self.ctx.opsctl('install --only rabbitmq')}")

    @staticmethod
    def q(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    # --- writing: pika ---------------------------------------------------------------
    @property
    def channel(self):
        if self._channel is None:
            import pika

            params = self.server.connection_parameters(connection_attempts=3)
            self._channel = pika.BlockingConnection(params).channel()
        return self._channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.connection.close()
            self._channel = None

    def changes(self, apply: bool) -> list[Change]:
        try:
            return super().changes(apply)
        finally:
            self.close()

    # --- the plan -------------------------------------------------------------------
    def plan(self) -> Iterator[Change]:
        exchanges, queues, bindings = desired(self.ctx.spec)
        for exchange in exchanges:
            yield from self._exchange(exchange)
        for queue in queues:
            yield from self._queue(queue)
        for binding in bindings:
            found = self.api(f"bindings/%2F/e/{self.q(binding.source)}/{binding.kind}/"
                             f"{self.q(binding.destination)}") or []
            if not any(b["routing_key"] == binding.routing_key for b in found):
                yield Change("create", f"binding {binding.source} → {binding.destination}",
                             f"key '{binding.routing_key}'", apply=lambda b=binding: self._bind(b))

    def _exchange(self, exchange: Exchange) -> Iterator[Change]:
        found = self.api(f"exchanges/%2F/{self.q(exchange.name)}")
        declare = lambda: self.channel.exchange_declare(exchange.name, exchange.type, durable=True)
        if found is None:
            yield Change("create", f"exchange {exchange.name}", exchange.type, apply=declare)
        elif found["type"] != exchange.type or not found["durable"]:
            detail = f"type {found['type']} → {exchange.type}, durable {found['durable']} → True"

            def replace():
                self._require_recreate(f"exchange {exchange.name}", detail)
                self.channel.exchange_delete(exchange.name)
                declare()
            yield Change("update", f"exchange {exchange.name}", detail, apply=replace)

    def _queue(self, queue: Queue) -> Iterator[Change]:
        found = self.api(f"queues/%2F/{self.q(queue.name)}")
        declare = lambda: self.channel.queue_declare(queue.name, durable=True,
                                                     arguments=queue.arguments or None)
        if found is None:
            shown = ", ".join(f"{k}={v}" for k, v in queue.arguments.items())
            yield Change("create", f"queue {queue.name}", shown, apply=declare)
            return
        current = found.get("arguments") or {}
        differs = [f"{k} {current.get(k)} → {queue.arguments.get(k)}"
                   for k in sorted(set(current) | set(queue.arguments))
                   if current.get(k) != queue.arguments.get(k)]
        if not found.get("durable"):
            differs.append("durable False → True")
        if not differs:
            return
        detail = "; ".join(differs)

        def replace():
            self._require_recreate(f"queue {queue.name}", detail)
            # From the broker itself: the management API's counts lag by seconds.
            messages = self.channel.queue_declare(queue.name, passive=True).method.message_count
            if messages and not self.force:
                raise OpsError(f"queue {queue.name} holds {messages} message(s); not recreated",
                               "drain it first, or add --force to drop them")
            self.channel.queue_delete(queue.name)
            declare()
        yield Change("update", f"queue {queue.name}", f"arguments differ: {detail}", apply=replace)

    def _require_recreate(self, what: str, detail: str) -> None:
        if not self.recreate:
            raise OpsError(f"{what} exists with other settings ({detail})",
                           "replace it with: opsctl queues apply --recreate "
                           "(only when empty; --force drops its messages)")

    def _bind(self, binding: Binding) -> None:
        if binding.kind == "q":
            self.channel.queue_bind(binding.destination, binding.source, binding.routing_key)
        else:
            self.channel.exchange_bind(binding.destination, binding.source, binding.routing_key)

    # --- status -----------------------------------------------------------------------
    def queue_status(self) -> list[dict]:
        rows = []
        for queue in desired(self.ctx.spec)[1]:
            info = self.api(f"queues/%2F/{self.q(queue.name)}?msg_rates_age=60&msg_rates_incr=5")
            if info is None:
                rows.append({"queue": queue.name, "exists": False})
                continue
            stats = info.get("message_stats") or {}
            rows.append({
                "queue": queue.name, "exists": True, "messages": info.get("messages", 0),
                "ready": info.get("messages_ready", 0),
                "unacked": info.get("messages_unacknowledged", 0),
                "consumers": info.get("consumers", 0),
                "publish_rate": (stats.get("publish_details") or {}).get("rate", 0.0),
                "deliver_rate": (stats.get("deliver_get_details") or {}).get("rate", 0.0),
            })
        return rows
