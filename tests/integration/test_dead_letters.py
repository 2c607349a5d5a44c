"""Dead letters on the real local platform: a consumer dead-letters an order its store can
never hold at once, with the reason; the order's Redis entry says so; Prometheus alerts
while orders-dead-letter is not empty; `opsctl orders dead-letters` lists, shows, redrives
and drops them."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.conftest import NAMES

from tests.integration.helpers import wait_for
from tests.integration.test_order_services import redis_admin  # noqa: F401 (fixture)
from tests.integration.test_order_workers import (  # noqa: F401 (fixtures)
    DEAD_LETTER, QUEUES, order, postgres, priority_rows, publish, rabbit,
    topology, vault_secrets, workers)

pytestmark = pytest.mark.integration


def depth(channel, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def poison(kind: str = "priority") -> dict:
    document = order(kind)
    document["customer"]["name"] = "Ada\u0000Lovelace"  # PostgreSQL's jsonb refuses \u0000
    return document


def cli(platform, *args: str, stdin: str | None = None):
    result = platform.run("orders", "dead-letters", *args, "-o", "json", stdin=stdin)
    result.json = json.loads(result.stdout) if result.stdout.strip() else None
    return result


def alerts(platform) -> list[dict]:
    from opsctl import httpclient

    url = f"http://127.0.0.1:{platform.port('prometheus-grafana', 'http')}/api/v1/alerts"
    return [a for a in httpclient.get(url)["data"]["alerts"]
            if a["labels"].get("alertname") == "OrdersDeadLettered"]


def test_a_data_error_is_dead_lettered_at_once_with_its_reason(workers, rabbit, postgres,
                                                                redis_admin):
    worker = workers("premium-consumer")
    bad, before, after = poison(), order("priority"), order("priority")
    started = time.monotonic()
    for document in (before, bad, after):
        publish(rabbit, document)
    wait_for(lambda: depth(rabbit, DEAD_LETTER) == 1, 30, what="the order dead-lettered")
    took = time.monotonic() - started
    assert took < 1.5, f"{took:.2f}s: the queue waited for a message that can never be stored"
    method, props, body = rabbit.basic_get(DEAD_LETTER, auto_ack=True)
    assert json.loads(body) == bad
    headers = props.headers
    assert "x-attempts" not in headers and "x-death" not in headers  # ours, not RabbitMQ's
    assert "Unicode" in headers["x-dead-letter-reason"], headers
    assert headers["x-dead-letter-queue"] == NAMES.queues.priority
    assert headers["x-dead-letter-routing-key"] == "priority"
    assert headers["x-dead-lettered-by"] == "premium-consumer" and headers["x-dead-lettered-at"]
    assert props.message_id == bad["order_id"] and props.priority == 5
    wait_for(lambda: len(priority_rows(postgres, [before["order_id"], after["order_id"]])) == 2,
             what="the orders around it stored")
    assert not priority_rows(postgres, [bad["order_id"]])
    assert worker.metric('messages_processed_total{result="dead_lettered"}') == 1
    assert worker.metric('messages_processed_total{result="retried"}') == 0
    # GET /order/{id} reads this entry: it says the order was dead-lettered, and why.
    entry = json.loads(wait_for(lambda: redis_admin.get(f"order:{bad['order_id']}"),
                                10, what="the Redis entry"))
    assert entry["status"] == "dead-lettered" and "Unicode" in entry["dead_letter_reason"]
    assert entry["order_id"] == bad["order_id"] and redis_admin.ttl(f"order:{bad['order_id']}") > 0


def test_the_consumers_redis_user_may_only_mark_orders(topology):
    import redis

    creds = vault_secrets(topology, "regular-consumer")
    client = redis.Redis(host="127.0.0.1", port=topology.port("redis", "redis"),
                         username=creds["redis_username"], password=creds["redis_password"],
                         socket_timeout=5)
    try:
        assert client.ping()
        assert client.set("order:acl-test", "{}", ex=5)
        for refused in (lambda: client.get("order:acl-test"), lambda: client.set("idempotency:x", "1"),
                        lambda: client.keys("*"), lambda: client.flushall(),
                        lambda: client.config_get("*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
    finally:
        client.close()


def test_redis_down_does_not_hold_dead_lettering_up(topology, workers, rabbit):
    from opsctl.components import build
    from tests.integration.conftest import workdir_context

    worker = workers("premium-consumer")
    assert build("redis", workdir_context(topology)).stop()
    try:
        bad = poison()
        started = time.monotonic()
        publish(rabbit, bad)
        wait_for(lambda: depth(rabbit, DEAD_LETTER) == 1, 30, what="dead-lettered without Redis")
        assert time.monotonic() - started < 5
        later = poison()
        publish(rabbit, later)
        wait_for(lambda: depth(rabbit, DEAD_LETTER) == 2, 10, what="the next one too, at once")
        assert "could not be marked" in worker.log()
    finally:
        code, steps = topology.steps("--only", "redis")
        assert code == 0, steps


def test_the_dead_letters_command_and_the_alert(topology, workers, rabbit, redis_admin):
    worker = workers("premium-consumer")
    first, second = poison(), poison()
    for document in (first, second):
        publish(rabbit, document)
    wait_for(lambda: depth(rabbit, DEAD_LETTER) == 2, 30, what="two orders dead-lettered")
    assert worker.stop() == 0  # so that a redriven order stays in its queue for us to see

    listed = cli(topology, "list")
    assert listed.returncode == 0, listed.stderr
    letters = {d["id"]: d for d in listed.json["letters"]}
    assert set(letters) == {first["order_id"], second["order_id"]}
    letter = letters[first["order_id"]]
    assert letter["type"] == "priority" and letter["queue"] == NAMES.queues.priority
    assert "Unicode" in letter["reason"] and letter["dead_lettered_at"]
    assert depth(rabbit, DEAD_LETTER) == 2  # looking took nothing away
    text = topology.run("orders", "dead-letters")  # no verb: list, for people
    assert text.returncode == 0 and first["order_id"] in text.stdout, text.stderr

    shown = cli(topology, "show", first["order_id"])
    assert shown.returncode == 0, shown.stderr
    assert shown.json["body"] == first
    assert shown.json["headers"]["x-dead-letter-queue"] == NAMES.queues.priority
    assert shown.json["properties"]["message_id"] == first["order_id"]

    unknown = cli(topology, "show", "no-such-order")
    assert unknown.returncode == 2
    assert "no-such-order" in unknown.json["error"]["message"]
    assert cli(topology, "redrive", first["order_id"], "no-such-order").returncode == 2
    assert depth(rabbit, DEAD_LETTER) == 2  # an unknown id: nothing done

    # Prometheus: the alert fires while the queue is not empty.
    firing = wait_for(lambda: [a for a in alerts(topology) if a["state"] == "firing"], 60,
                      interval=1, what="OrdersDeadLettered firing")
    assert firing[0]["labels"]["queue"] == DEAD_LETTER

    redriven = cli(topology, "redrive", first["order_id"])
    assert redriven.returncode == 0, redriven.stderr
    assert [d["id"] for d in redriven.json["redriven"]] == [first["order_id"]]
    method, props, body = rabbit.basic_get(QUEUES["priority"], auto_ack=True)
    assert json.loads(body) == first and method.routing_key == "priority"
    assert props.message_id == first["order_id"] and props.priority == 5
    assert not any(k.startswith("x-dead") for k in (props.headers or {}))
    assert json.loads(redis_admin.get(f"order:{first['order_id']}")).get("status") is None
    assert depth(rabbit, DEAD_LETTER) == 1

    refused = cli(topology, "drop", second["order_id"])  # no terminal to confirm at
    assert refused.returncode == 2 and "--yes" in refused.json["error"]["hint"]
    assert depth(rabbit, DEAD_LETTER) == 1
    dropped = cli(topology, "drop", second["order_id"], "--yes")
    assert dropped.returncode == 0, dropped.stderr
    assert [d["id"] for d in dropped.json["dropped"]] == [second["order_id"]]
    assert depth(rabbit, DEAD_LETTER) == 0
    assert cli(topology, "list").json["letters"] == []

    # … and stops once it is empty.
    wait_for(lambda: not alerts(topology), 60, interval=1, what="OrdersDeadLettered resolved")


def test_the_alert_rule_names_a_metric_rabbitmq_serves(topology):
    """The rule's metric, checked against the running RabbitMQ's own Prometheus endpoint."""
    import urllib.request

    from opsctl import httpclient

    port = topology.port("rabbitmq", "prometheus")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    assert any(line.startswith("rabbitmq_queue_messages{") and f'queue="{DEAD_LETTER}"' in line
               for line in lines)
    base = f"http://127.0.0.1:{topology.port('prometheus-grafana', 'http')}/api/v1/rules"
    [group] = [g for g in httpclient.get(base)["data"]["groups"] if g["name"] == "order-flow"]
    assert group["rules"][0]["name"] == "OrdersDeadLettered"
    assert group["rules"][0]["health"] in ("ok", "unknown"), group["rules"][0]
