"""The RabbitMQ topology on the real broker: apply, drift, differing arguments, status."""


import pika
import pytest

pytestmark = pytest.mark.integration


def channel(platform):
    return platform.amqp().channel()


def test_install_declared_the_topology_and_it_is_in_sync(platform):
    assert platform.first_install[1]["rabbitmq-topology"]["state"] == "changed"
    assert platform.run("queues", "diff").returncode == 0
    status = platform.run("queues", "status", "-o", "json", check_json=True)
    assert status.returncode == 0
    assert [q["queue"] for q in status.json["queues"]] == [
        "priority-orders", "regular-orders", "digital-orders", "orders-validation", "orders-dead-letter"]


def test_routing_follows_the_spec(platform):
    ch = channel(platform)
    for queue in ("priority-orders", "regular-orders", "digital-orders"):
        ch.queue_purge(queue)
    ch.confirm_delivery()
    for key in ("priority", "regular", "digital"):
        ch.basic_publish("order-exchange", key, key.encode(), pika.BasicProperties(delivery_mode=2),
                         mandatory=True)
    for queue, body in (("priority-orders", b"priority"), ("regular-orders", b"regular"),
                        ("digital-orders", b"digital")):
        method, _, got = ch.basic_get(queue, auto_ack=True)
        assert got == body, queue
    ch.connection.close()


def test_missing_binding_is_drift_and_apply_restores_it(platform):
    ch = channel(platform)
    ch.queue_unbind("regular-orders", "order-exchange", "regular")
    ch.connection.close()
    diff = platform.run("queues", "diff", "-o", "json", check_json=True)
    assert diff.returncode == 1
    assert [c["object"] for c in diff.json["changes"]] == ["binding order-exchange → regular-orders"]
    assert platform.run("queues", "apply").returncode == 0
    assert platform.run("queues", "diff").returncode == 0


def test_queue_with_other_arguments_is_reported_and_only_replaced_when_asked(platform):
    ch = channel(platform)
    ch.queue_delete("orders-validation")
    ch.queue_declare("orders-validation", durable=True, arguments={"x-max-priority": 3})
    ch.basic_publish("", "orders-validation", b"keep me", pika.BasicProperties(delivery_mode=2))
    ch.connection.close()

    refused = platform.run("queues", "apply")
    assert refused.returncode == 1
    assert "queue orders-validation exists with other settings" in refused.stderr
    assert "x-max-priority 3 → None" in refused.stderr and "--recreate" in refused.stderr
    not_empty = platform.run("queues", "apply", "--recreate")
    assert not_empty.returncode == 1 and "holds 1 message(s)" in not_empty.stderr
    ch = channel(platform)
    assert ch.queue_declare("orders-validation", passive=True).method.message_count == 1  # kept
    ch.connection.close()
    forced = platform.run("queues", "apply", "--recreate", "--force")
    assert forced.returncode == 0, forced.stderr
    assert platform.run("queues", "diff").returncode == 0


def test_force_without_recreate_is_a_usage_error(platform):
    assert platform.run("queues", "apply", "--force").returncode == 2
