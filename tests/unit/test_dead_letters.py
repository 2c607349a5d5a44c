"""opsctl's side of dead letters without servers: how a letter is read (ours and RabbitMQ's
own), the Prometheus rule, the Redis ACLs, and the command's refusals."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import types
from pathlib import Path

import yaml

from opsctl import spec
from opsctl.context import Context
from opsctl.app.dead_letters import Letter


def props(**kw):
    base = dict(message_id=None, headers=None, content_type="application/json",
                content_encoding=None, delivery_mode=2, priority=None, correlation_id=None,
                timestamp=None, type=None, app_id=None)
    return types.SimpleNamespace(**{**base, **kw})


ORDER = {"order_id": "o-1", "type": "digital", "customer": {"id": "c", "name": "Ada"}}


def test_a_letter_a_consumer_dead_lettered_carries_its_reason():
    letter = Letter.of(1, props(message_id="o-1", priority=3, headers={
        "x-dead-letter-reason": "the store refuses it: InvalidDocument", "x-dead-letter-queue": b"digital-orders",
        "x-dead-letter-routing-key": "digital", "x-dead-lettered-at": "2026-12-01T10:00:00+00:00"}),
        json.dumps(ORDER).encode())
    assert letter.summary() == {"id": "o-1", "order_id": "o-1", "type": "digital",
                                "queue": "digital-orders", "routing_key": "digital",
                                "reason": "the store refuses it: InvalidDocument",
                                "dead_lettered_at": "2026-12-01T10:00:00+00:00"}
    full = letter.full()
    assert full["body"] == ORDER and full["properties"]["priority"] == 3
    json.dumps(full)  # renderable as JSON


def test_a_letter_rabbitmq_dead_lettered_by_itself_is_read_from_x_death():
    when = dt.datetime(2026, 12, 1, 10, 0)
    letter = Letter.of(2, props(headers={"x-death": [{
        "queue": "regular-orders", "reason": "rejected", "time": when,
        "routing-keys": ["regular"], "exchange": "order-exchange", "count": 1}]}), b"{oops")
    assert letter.id.startswith("sha256:") and letter.order_id is None
    assert letter.queue == "regular-orders" and letter.routing_key == "regular"
    assert letter.reason == "rejected by RabbitMQ (no reason recorded)"
    assert letter.when == when.isoformat()
    assert letter.full()["body"] == "{oops"
    json.dumps(letter.full())


def context(tmp_path: Path) -> Context:
    return Context(spec.load(None), "local", tmp_path / ".opsctl")


def test_prometheus_alerts_on_the_dead_letter_queue(tmp_path):
    from opsctl.components.prometheus import Prometheus

    files = Prometheus("prometheus-grafana", context(tmp_path)).config_files()
    config, rules = yaml.safe_load(files["prometheus.yml"]), yaml.safe_load(files["rules.yml"])
    [rule] = rules["groups"][0]["rules"]
    assert rule["alert"] == "OrdersDeadLettered"
    assert 'rabbitmq_queue_messages{queue="orders-dead-letter"}' in rule["expr"]
    assert rule["expr"].endswith("> 0")
    assert config["rule_files"] == [str(tmp_path / ".opsctl/local/prometheus-grafana/rules.yml")]
    assert config["global"]["evaluation_interval"] == "5s"


def test_each_service_gets_only_its_redis_commands(tmp_path):
    from opsctl.components.redis import Redis

    redis = Redis("redis", context(tmp_path))
    keys, commands = redis.acl("premium-consumer")
    assert keys == ["~order:*"] and set(commands) == {"-@all", "+set", "+ping"}
    keys, commands = redis.acl("order-creator")
    assert "~*" not in keys and "+@all" not in commands and "+flushall" not in commands
    assert redis.acl("cdc-bridge") == ([], ["-@all", "+ping"])


def test_the_consumers_have_redis_credentials_and_the_dead_letter_exchange(tmp_path):
    from opsctl.components import services

    ctx = context(tmp_path)
    for name in ("premium-consumer", "regular-consumer", "digital-consumer"):
        assert "redis" in ctx.spec.services[name].credentials
        env = services.environment(ctx, name, "secret")
        assert env["DEAD_LETTER_EXCHANGE"] == "orders-dlx" and env["REDIS_HOST"]
    assert services.environment(ctx, "stock-service", "s")["STOCK_SERVICE_ROLE"] == "vault-reader"


def test_drop_without_a_terminal_or_yes_is_refused_before_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "opsctl", "orders", "dead-letters", "drop",
                             "o-1", "-o", "json"], cwd=tmp_path, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2
    assert "--yes" in json.loads(result.stdout)["error"]["hint"]
    assert not (tmp_path / ".opsctl").exists()  # nothing was touched
