"""The consumers when things go wrong on the real local platform: stopped or killed
mid-burst, a store down, RabbitMQ restarted, SIGTERM with a backlog; and their throughput
(workers and stores as in test_order_workers)."""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import NAMES
from tests.integration.helpers import stored, wait_for
from tests.integration.test_order_workers import (DEAD_LETTER, QUEUES, Paced, admin_connection,  # noqa: F401
                                                  mongo, order, postgres, priority_rows, publish, rabbit,
                                                  topology, workers)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
@pytest.mark.parametrize("service,kind", [("premium-consumer", "priority"),
                                          ("regular-consumer", "regular")])
def test_consumer_stopped_mid_burst_stores_every_message_once(topology, workers, rabbit, postgres,
                                                              mongo, service, kind, how):
    orders = [order(kind) for _ in range(300)]
    ids = [o["order_id"] for o in orders]

    def rows() -> dict[str, list]:
        return priority_rows(postgres, ids) if kind == "priority" else stored(mongo[NAMES.mongodb.orders], ids)

    worker = workers(service)
    burst = Paced(topology, orders, rate=150)
    burst.start()
    wait_for(lambda: len(rows()) >= 40, what="40 orders stored")
    if how == "kill -9":
        worker.kill()
    else:
        assert worker.stop() == 0  # finishes the batch in hand, gives back the prefetched rest
        assert "stopped" in worker.log()
    at_stop = len(rows())
    assert at_stop < 300
    worker.start()
    burst.join(30)
    assert burst.error is None and burst.published == 300
    wait_for(lambda: len(rows()) == 300, timeout=90, what="all 300 orders stored")
    assert {k: len(v) for k, v in rows().items()} == {i: 1 for i in ids}
    wait_for(lambda: rabbit.queue_declare(QUEUES[kind], passive=True).method.message_count == 0,
             what="the queue drained")
    print(f"\n{service}: {at_stop} of 300 stored at {how}, all 300 once after the restart")
    assert worker.stop() == 0


@pytest.mark.parametrize("service,kind,store", [("premium-consumer", "priority", "postgres"),
                                                ("regular-consumer", "regular", "mongodb")])
def test_store_down_holds_the_messages_without_using_up_their_tries(
        topology, workers, rabbit, postgres, mongo, service, kind, store):
    from opsctl.components import build
    from tests.integration.conftest import workdir_context

    worker = workers(service)
    orders = [order(kind) for _ in range(10)]
    ids = [o["order_id"] for o in orders]
    assert build(store, workdir_context(topology)).stop()
    try:
        for document in orders:
            publish(rabbit, document)
        time.sleep(8)  # longer than DELIVERY_ATTEMPTS quick tries would take
        assert worker.process.poll() is None
        assert worker.metric('messages_processed_total{result="retried"}') == 0
        assert worker.metric('messages_processed_total{result="dead_lettered"}') == 0
        assert rabbit.queue_declare(DEAD_LETTER, passive=True).method.message_count == 0
    finally:
        code, steps = topology.steps("--only", store)
        assert code == 0, steps

    def rows() -> dict[str, list]:
        if kind == "priority":
            return priority_rows(postgres, ids)
        return stored(mongo[NAMES.mongodb.orders], ids)
    wait_for(lambda: len(rows()) == 10, timeout=60,
             what="the held orders stored once the store is back")
    assert {k: len(v) for k, v in rows().items()} == {i: 1 for i in ids}
    assert "message(s) held" in worker.log()
    assert worker.stop() == 0


@pytest.mark.parametrize("service,kind", [("premium-consumer", "priority"),
                                          ("regular-consumer", "regular"),
                                          ("digital-consumer", "digital")])
def test_throughput(workers, rabbit, postgres, mongo, service, kind):
    """A backlog of 2000 orders drained by one consumer (printed with -s)."""
    orders = [order(kind) for _ in range(2000)]
    for document in orders:
        publish(rabbit, document)
    worker = workers(service)
    stored_metric = 'messages_processed_total{result="stored"}'
    first = wait_for(lambda: worker.metric(stored_metric) or None, interval=0.005,
                     what="the first order stored")
    started = time.monotonic()
    wait_for(lambda: worker.metric(stored_metric) >= 2000, timeout=180, interval=0.01,
             what="2000 orders stored")
    took = time.monotonic() - started
    assert worker.metric('messages_processed_total{result="duplicate"}') == 0
    print(f"\n{service}: {2000 - first:.0f} orders in {took:.2f}s = "
          f"{(2000 - first) / took:.0f} messages/s")


def test_consumer_reconnects_when_rabbitmq_restarts(topology, workers, rabbit, mongo):
    from opsctl.components import build
    from tests.integration.conftest import workdir_context

    worker = workers("regular-consumer")
    first = order("regular")
    publish(rabbit, first)
    wait_for(lambda: stored(mongo[NAMES.mongodb.orders], [first["order_id"]]), what="the first order stored")
    rabbit.connection.close()

    assert build("rabbitmq", workdir_context(topology)).stop()  # as `opsctl down` stops it
    code, steps = topology.steps("--only", "rabbitmq")
    assert code == 0 and steps["rabbitmq"]["state"] == "changed", steps

    connection = admin_connection(topology)
    channel = connection.channel()
    channel.confirm_delivery()
    later = [order("regular") for _ in range(10)]
    for document in later:
        publish(channel, document)
    ids = [o["order_id"] for o in later]
    wait_for(lambda: len(stored(mongo[NAMES.mongodb.orders], ids)) == 10, timeout=90,
             what="the orders published after the restart stored")
    connection.close()
    assert worker.process.poll() is None
    assert "retrying in" in worker.log()
    assert worker.stop() == 0


def test_sigterm_acknowledges_what_it_stored_and_gives_back_the_rest(workers, rabbit, mongo):
    """With a backlog, SIGTERM finishes the batch in hand: whatever was stored was
    acknowledged (the restart finds no duplicate), the prefetched rest goes back."""
    orders = [order("regular") for _ in range(2000)]
    ids = [o["order_id"] for o in orders]
    for document in orders:
        publish(rabbit, document)
    worker = workers("regular-consumer")
    stored_metric = 'messages_processed_total{result="stored"}'
    wait_for(lambda: worker.metric(stored_metric) >= 200, interval=0.01, what="200 stored")
    assert worker.stop() == 0  # the prefetched rest, if any, is given back ("gave back N")
    before = len(stored(mongo[NAMES.mongodb.orders], ids))
    assert before < 2000
    worker.start()
    wait_for(lambda: len(stored(mongo[NAMES.mongodb.orders], ids)) == 2000, timeout=120, what="all stored")
    assert worker.metric('messages_processed_total{result="duplicate"}') == 0
    assert worker.metric(stored_metric) == 2000 - before
    assert worker.stop() == 0
