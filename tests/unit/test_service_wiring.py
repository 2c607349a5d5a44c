"""Each bundled service's wiring comes from its entry in platform.yaml `services:` (and the
user's opsctl.yaml over it): its environment, its users' permissions, the edge's routes.
Nothing is keyed by a service's name in code, so a renamed queue or collection reaches every
side."""

from __future__ import annotations

import pytest

from opsctl import spec
from opsctl.context import Context
from opsctl.components.mongodb import MongoDB
from opsctl.components.nginx import Nginx
from opsctl.components.rabbitmq import RabbitMQ
from opsctl.components.services import environment
from opsctl.errors import UsageError

RENAMED = """
names:
  queues: {digital: e-orders}
  mongodb: {digital_orders: e_orders}
  exchanges: {orders: orders-in}
"""


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPSCTL_CONFIG", raising=False)
    (tmp_path / "opsctl.yaml").write_text(RENAMED)
    return Context(spec.load(None), "local", tmp_path / ".opsctl")


def test_a_consumer_reads_its_queue_into_its_store_and_collection_as_renamed(ctx):
    env = environment(ctx, "digital-consumer", "s")
    assert (env["QUEUE"], env["STORE"], env["MONGODB_COLLECTION"]) == ("e-orders", "mongodb", "e_orders")
    premium = environment(ctx, "premium-consumer", "s")
    assert premium["STORE"] == "postgres" and "MONGODB_COLLECTION" not in premium
    assert "QUEUE" not in environment(ctx, "cdc-bridge", "s")


def test_only_the_stock_services_callers_get_its_url_and_it_admits_only_them(ctx):
    assert "STOCK_URL" in environment(ctx, "order-creator", "s")
    assert "STOCK_URL" not in environment(ctx, "premium-consumer", "s")
    stock = environment(ctx, "stock-service", "s")
    assert stock["STOCK_SERVICE_CLIENTS"] == "order-creator"
    assert stock["STOCK_SERVICE_AUDIENCE"] == ctx.spec.names.keycloak.stock_api_audience


def test_the_streaming_job_alone_gets_the_model_and_stops_its_driver_only(ctx):
    from opsctl.components.services import BundledService

    assert ctx.spec.stream_job == "order-screening"
    assert "MODEL_DIR" in environment(ctx, "order-screening", "s")
    assert "MODEL_DIR" not in environment(ctx, "regular-consumer", "s")
    assert not BundledService("order-screening", ctx).stop_group
    assert BundledService("regular-consumer", ctx).stop_group


def test_rabbitmq_permissions_follow_what_each_service_consumes_and_publishes(ctx):
    rabbit = RabbitMQ("rabbitmq", ctx)
    creator, consumer, bridge = (rabbit.permissions(s) for s in
                                 ("order-creator", "digital-consumer", "cdc-bridge"))
    assert creator == {"configure": "^$", "write": "^(orders\\-in)$", "read": "^$"}
    assert consumer["read"] == "^(e\\-orders)$" and "orders\\-dlx" in consumer["write"]
    assert "orders\\-in" not in consumer["write"]  # a consumer cannot place orders
    assert bridge == {"configure": "^$", "write": "^$", "read": "^$"}
    assert rabbit.permissions("order-screening")["write"] == "^(orders\\-in)$"


def test_the_cdc_bridge_may_only_read_and_the_consumers_write(ctx):
    mongodb = MongoDB("mongodb", ctx)
    assert mongodb._role("cdc-bridge")[0] == "order-reader"
    assert "insert" not in mongodb._role("cdc-bridge")[1]
    assert mongodb._role("regular-consumer")[0] == "order-writer"


def test_the_edge_routes_the_paths_each_http_service_lists(ctx):
    from opsctl.components.nginx import ROUTE_ERROR_PAGES

    config = Nginx("nginx", ctx).config_files()["nginx.conf"]
    assert (f"location = /create {{ set $edge_service order-creator; proxy_pass http://switch; "
            f"{ROUTE_ERROR_PAGES} }}") in config
    assert (f"location /stock/ {{ set $edge_service stock-service; proxy_pass http://switch; "
            f"{ROUTE_ERROR_PAGES} }}") in config
    assert "error_page 400" not in ROUTE_ERROR_PAGES  # a service's own 400 reaches the client
    assert "/metrics" not in config


@pytest.mark.parametrize("override,expected", [
    ("services:\n  premium-consumer: {credentials: [rabbitmq]}\n", "store postgres needs postgres in credentials"),
    ("services:\n  cdc-bridge: {collection: null}\n", "names its collection"),
    ("services:\n  premium-consumer: {role: reader}\n", "role reader needs store mongodb"),
    ("services:\n  order-creator: {calls: [cdc-bridge]}\n", "cdc-bridge is not an HTTP service"),
    ("services:\n  cdc-bridge: {routes: [/x]}\n", "only an HTTP service"),
    ("services:\n  cdc-bridge: {runtime: spark}\n", "exactly one service is the streaming job"),
    ("services:\n  regular-consumer: {consumes: validation}\n", "services.regular-consumer.consumes"),
])
def test_inconsistent_wiring_is_refused_naming_the_field(tmp_path, monkeypatch, override, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPSCTL_CONFIG", raising=False)
    (tmp_path / "opsctl.yaml").write_text(override)
    with pytest.raises(UsageError) as info:
        spec.load(None)
    assert expected in info.value.message


def test_the_switch_sends_every_routed_service_to_one_colour_and_never_resends_a_request(ctx):
    from opsctl.components.edge_switch import EdgeSwitch

    switch = EdgeSwitch(ctx)
    (config,) = switch.routes("green")["resources"]
    assert config["response_headers_to_add"][0]["header"] == {"key": "X-Colour", "value": "green"}
    routes = [r for r in config["virtual_hosts"][0]["routes"] if "route" in r]
    assert sorted(r["route"]["cluster"] for r in routes) == ["order-creator-green", "stock-service-green"]
    # Only what never reached the ingress is tried again.
    assert all(set(r["route"]["retry_policy"]["retry_on"].split(",")) == {"connect-failure", "reset-before-request"}
               for r in routes)
    clusters = {c["name"] for c in switch.clusters()["resources"]}
    assert clusters == {f"{s}-{c}" for s in ("order-creator", "stock-service") for c in ("blue", "green")}
    assert switch.routes("green")["version_info"] != switch.routes("blue")["version_info"]
