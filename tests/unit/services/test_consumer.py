"""The consumer's settling of a batch, with an in-memory channel, store and Redis (the real
ones are in tests/integration/test_order_workers.py and test_dead_letters.py): what is
dead-lettered at once, with which headers, what is retried, and that nothing waits."""

from __future__ import annotations

import json
import types

import pytest

from order_services import consumer_stores
from order_services.consumer import (Consumer, Delivery, OrderStatus, Settings, StoreRefused,
                                     make_metrics)

ENV = {"SERVICE_NAME": "premium-consumer", "STORE": "postgres", "QUEUE": "priority-orders", "RABBITMQ_HOST": "h",
       "RABBITMQ_PORT": "5672", "DELIVERY_ATTEMPTS": "5", "METRICS_PORT": "9101",
       "POSTGRES_HOST": "h", "POSTGRES_PORT": "5432", "POSTGRES_DB": "orders",
       "DEAD_LETTER_EXCHANGE": "orders-dlx", "REDIS_HOST": "127.0.0.1", "REDIS_PORT": "6379"}


class FakeChannel:
    def __init__(self):
        self.published, self.acked, self.rejected, self.nacked = [], [], [], []
        self.refuse_publish = None

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False):
        if self.refuse_publish:
            raise self.refuse_publish
        self.published.append((exchange, routing_key, body, properties))

    def basic_ack(self, tag):
        self.acked.append(tag)

    def basic_reject(self, tag, requeue=True):
        self.rejected.append((tag, requeue))

    def basic_nack(self, tag, requeue=True):
        self.nacked.append((tag, requeue))


class FakeStore:
    """Refuses the documents whose customer name holds \\u0000 (as jsonb does), or those
    listed in `passing` for a reason that may pass."""

    def __init__(self):
        self.rows, self.passing = {}, set()

    def write(self, documents):
        for d in documents:
            if "\u0000" in d["customer"]["name"]:
                raise StoreRefused("UntranslatableCharacter: unsupported Unicode escape sequence", True)
            if d["order_id"] in self.passing:
                raise StoreRefused("InsufficientPrivilege: permission denied", False)
        new = [d["order_id"] not in self.rows for d in documents]
        self.rows.update({d["order_id"]: d for d in documents})
        return new


class FakeRedis:
    def __init__(self, down=False):
        self.data, self.down, self.calls = {}, down, 0

    def set(self, name, value, ex=None):
        self.calls += 1
        if self.down:
            raise ConnectionError("Connection refused")
        self.data[name] = value


class Props(types.SimpleNamespace):
    def __init__(self, **kw):
        base = dict(content_type="application/json", content_encoding=None, headers=None,
                    delivery_mode=2, priority=5, correlation_id=None, reply_to=None,
                    expiration=None, message_id=None, timestamp=None, type=None, app_id=None)
        super().__init__(**{**base, **kw})


@pytest.fixture
def consumer(monkeypatch):
    settings = Settings.from_env(ENV)
    c = Consumer(settings, credentials=None, store=FakeStore(), metrics=make_metrics_once())
    c.channel = FakeChannel()
    c.status.client = FakeRedis()
    c.slept = []
    monkeypatch.setattr(c, "sleep", lambda seconds: c.slept.append(seconds))
    return c


_METRICS = None


def make_metrics_once():
    global _METRICS  # prometheus_client's default registry takes each name once
    if _METRICS is None:
        _METRICS = make_metrics()
    return _METRICS


def delivery(tag: int, name: str = "Ada Lovelace", order_id: str | None = None, body=None):
    document = {"order_id": order_id or f"order-{tag}", "type": "priority",
                "customer": {"id": "c-1", "name": name}, "items": [], "total": 1.0}
    raw = body if body is not None else json.dumps(document).encode()
    return Delivery(tag, Props(message_id=document["order_id"]), raw, False,
                    exchange="order-exchange", routing_key="priority")


def test_a_data_error_is_dead_lettered_at_once_with_its_reason_and_the_rest_stored(consumer):
    batch = [delivery(1), delivery(2, name="Ada\u0000Lovelace"), delivery(3)]
    consumer.handle(batch)
    assert consumer.slept == []  # the queue never waits for a message that can never be stored
    assert set(consumer.store.rows) == {"order-1", "order-3"}
    [(exchange, key, body, props)] = consumer.channel.published
    assert exchange == "orders-dlx" and key == "priority" and body == batch[1].body
    headers = props.headers
    assert "unsupported Unicode escape sequence" in headers["x-dead-letter-reason"]
    assert headers["x-dead-letter-queue"] == "priority-orders"
    assert headers["x-dead-letter-routing-key"] == "priority"
    assert headers["x-dead-lettered-by"] == "premium-consumer" and headers["x-dead-lettered-at"]
    assert props.message_id == "order-2" and props.priority == 5 and props.delivery_mode == 2
    assert sorted(consumer.channel.acked) == [1, 2, 3] and consumer.channel.rejected == []
    entry = json.loads(consumer.status.client.data["order:order-2"])
    assert entry["status"] == "dead-lettered" and "Unicode" in entry["dead_letter_reason"]
    assert entry["order_id"] == "order-2" and entry["customer"]["name"] == "Ada\u0000Lovelace"


def test_a_message_that_is_not_an_order_is_dead_lettered_with_the_reason(consumer):
    consumer.handle([delivery(7, body=b"{not json")])
    [(exchange, _, body, props)] = consumer.channel.published
    assert exchange == "orders-dlx" and body == b"{not json"
    assert props.headers["x-dead-letter-reason"].startswith("not JSON")
    assert consumer.channel.acked == [7] and consumer.status.client.data == {}


def test_a_passing_refusal_is_retried_after_a_wait_not_dead_lettered(consumer):
    consumer.store.passing = {"order-2"}
    consumer.handle([delivery(1), delivery(2)])
    assert consumer.slept and consumer.slept[0] > 0
    [(exchange, key, _, props)] = consumer.channel.published
    assert (exchange, key) == ("", "priority-orders") and props.headers["x-attempts"] == 1
    assert consumer.status.client.data == {}


def test_the_last_try_of_a_passing_refusal_is_dead_lettered_with_the_reason(consumer):
    consumer.store.passing = {"order-2"}
    last = delivery(2)
    last.properties.headers = {"x-attempts": 4}
    consumer.handle([last])
    [(exchange, _, _, props)] = consumer.channel.published
    assert exchange == "orders-dlx"
    assert props.headers["x-dead-letter-reason"].startswith("try 5 of 5 failed")
    assert props.headers["x-attempts"] == 4


def test_redis_down_does_not_hold_dead_lettering_up(consumer):
    consumer.status.client = redis = FakeRedis(down=True)
    consumer.handle([delivery(1, name="\u0000"), delivery(2, name="\u0000")])
    assert len(consumer.channel.published) == 2 and sorted(consumer.channel.acked) == [1, 2]
    assert redis.calls == 1  # after one failure Redis is left alone for a while


def test_a_failed_dead_letter_publish_falls_back_to_a_reject(consumer):
    import pika.exceptions

    consumer.channel.refuse_publish = pika.exceptions.NackError([])
    consumer.handle([delivery(1, name="\u0000")])
    assert consumer.channel.rejected == [(1, False)] and consumer.channel.acked == []


def test_without_a_dead_letter_exchange_the_queue_dead_letters(consumer):
    consumer.dead_letter_exchange = ""
    consumer.handle([delivery(1, name="\u0000")])
    assert consumer.channel.published == [] and consumer.channel.rejected == [(1, False)]


def test_no_redis_settings_means_no_mark_and_no_error():
    settings = Settings.from_env({k: v for k, v in ENV.items() if not k.startswith("REDIS")})
    status = OrderStatus(settings, credentials=None)
    status.dead_lettered({"order_id": "x"}, "reason", "now")  # logs, never raises
    assert settings.dead_letter_exchange == "orders-dlx"


def test_postgres_data_errors_are_permanent_and_others_pass():
    import psycopg

    assert issubclass(psycopg.errors.UntranslatableCharacter, psycopg.errors.DataError)
    assert not issubclass(psycopg.errors.InsufficientPrivilege,
                          (psycopg.errors.DataError, psycopg.errors.IntegrityError))
    # A serialization failure is an OperationalError: held as an outage, never dead-lettered.
    assert issubclass(psycopg.errors.SerializationFailure, psycopg.OperationalError)
    assert 11000 in consumer_stores.MONGO_PASSING


def test_a_worker_serves_its_metrics_where_metrics_host_says(monkeypatch):
    import socket
    import urllib.request

    from order_services.worker import serve_metrics

    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("METRICS_HOST", "127.0.0.2")
    url = serve_metrics(port)
    assert url == f"http://127.0.0.2:{port}/metrics"
    assert b"python_info" in urllib.request.urlopen(url, timeout=2).read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()  # not on another address
