"""The order API's publisher: order documents to ORDER_EXCHANGE with publisher confirms."""

from __future__ import annotations

import asyncio
from typing import Any

from order_services.order_model import amqp_priority

PUBLISH_TIMEOUT = 10.0           # seconds to wait for the broker's confirm
RECONNECT_INTERVAL = 1.0         # seconds between attempts to reach a lost broker
RECOVERY_WAIT = 3.0              # seconds an order waits for a reconnecting broker before a 503


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
