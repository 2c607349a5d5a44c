"""The RabbitMQ topology on the real broker: apply, drift, differing arguments, status."""


import pika
import pytest

from tests.integration.conftest import NAMES

pytestmark = pytest.mark.integration


def channel(platform):
    return platform.amqp().channel()


def test_install_declared_the_topology_and_it_is_in_sync(platform):
    assert platform.first_install[1]["rabbitmq-topology"]["state"] == "changed"
    assert platform.run("queues", "diff").returncode == 0
    status = platform.run("queues", "status", "-o", "json", check_json=True)
    assert status.returncode == 0
    assert [q["queue"] for q in status.json["queues"]] == [
        NAMES.queues.priority, NAMES.queues.regular, NAMES.queues.digital, NAMES.queues.validation, NAMES.queues.dead_letter]


def test_routing_follows_the_spec(platform):
    ch = channel(platform)
    for queue in (NAMES.queues.priority, NAMES.queues.regular, NAMES.queues.digital):
        ch.queue_purge(queue)
    ch.confirm_delivery()
    for key in ("priority", "regular", "digital"):
        ch.basic_publish(NAMES.exchanges.orders, key, key.encode(), pika.BasicProperties(delivery_mode=2),
                         mandatory=True)
    for queue, body in ((NAMES.queues.priority, b"priority"), (NAMES.queues.regular, b"regular"),
                        (NAMES.queues.digital, b"digital")):
        method, _, got = ch.basic_get(queue, auto_ack=True)
        assert got == body, queue
    ch.connection.close()


def test_missing_binding_is_drift_and_apply_restores_it(platform):
    ch = channel(platform)
    ch.queue_unbind(NAMES.queues.regular, NAMES.exchanges.orders, "regular")
    ch.connection.close()
    diff = platform.run("queues", "diff", "-o", "json", check_json=True)
    assert diff.returncode == 1
    assert [c["object"] for c in diff.json["changes"]] == [f"binding {NAMES.exchanges.orders} → {NAMES.queues.regular}"]
    assert platform.run("queues", "apply").returncode == 0
    assert platform.run("queues", "diff").returncode == 0


def test_queue_with_other_arguments_is_reported_and_only_replaced_when_asked(platform):
    ch = channel(platform)
    ch.queue_delete(NAMES.queues.validation)
    ch.queue_declare(NAMES.queues.validation, durable=True, arguments={"x-max-priority": 3})
    ch.basic_publish("", NAMES.queues.validation, b"keep me", pika.BasicProperties(delivery_mode=2))
    ch.connection.close()

    refused = platform.run("queues", "apply")
    assert refused.returncode == 1
    assert f"queue {NAMES.queues.validation} exists with other settings" in refused.stderr
    assert "x-max-priority 3 → None" in refused.stderr and "--recreate" in refused.stderr
    not_empty = platform.run("queues", "apply", "--recreate")
    assert not_empty.returncode == 1 and "holds 1 message(s)" in not_empty.stderr
    ch = channel(platform)
    assert ch.queue_declare(NAMES.queues.validation, passive=True).method.message_count == 1  # kept
    ch.connection.close()
    forced = platform.run("queues", "apply", "--recreate", "--force")
    assert forced.returncode == 0, forced.stderr
    assert platform.run("queues", "diff").returncode == 0


def test_force_without_recreate_is_a_usage_error(platform):
    assert platform.run("queues", "apply", "--force").returncode == 2
