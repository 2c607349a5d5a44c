"""The mesh's configuration entries, rendered from platform.yaml: the intentions allow only
the calls of the order flow (and the edge's routes through the ingress), in each datacenter
and from its peer; every HTTP service is exported to the peer and fails over to it."""

import json
from pathlib import Path

from opsctl import spec
from opsctl.components.mesh import INGRESS, _covers, config_entries, registration
from opsctl.context import Context


def entries(colour: str) -> dict:
    ctx = Context(spec.load(None), "local", Path("/nonexistent/.opsctl"))
    return {(e["Kind"], e["Name"]): e for e in config_entries(ctx, colour)}


def test_intentions_allow_only_the_calls_of_the_spec_and_deny_the_rest():
    green = entries("green")
    assert green[("service-intentions", "*")]["Sources"] == [{"Name": "*", "Action": "deny"}]
    stock = green[("service-intentions", "stock-service")]["Sources"]
    assert stock == [{"Name": "order-creator", "Action": "allow"}, {"Name": INGRESS, "Action": "allow"},
                     {"Name": "order-creator", "Peer": "dc1", "Action": "allow"},
                     {"Name": INGRESS, "Peer": "dc1", "Action": "allow"}]
    creator = green[("service-intentions", "order-creator")]["Sources"]
    assert {s["Name"] for s in creator} == {INGRESS}  # nobody in the mesh calls the order API
    assert ("service-intentions", "regular-consumer") not in green  # the workers are outside the mesh


def test_each_colour_exports_its_http_services_and_fails_over_to_the_peer():
    for colour, peer in (("blue", "dc2"), ("green", "dc1")):
        found = entries(colour)
        exported = found[("exported-services", "default")]["Services"]
        assert {s["Name"] for s in exported} == {"order-creator", "stock-service"}
        assert all(s["Consumers"] == [{"Peer": peer}] for s in exported)
        resolver = found[("service-resolver", "stock-service")]
        assert resolver["Failover"] == {"*": {"Targets": [{"Peer": peer}]}}
        assert found[("proxy-defaults", "global")]["MeshGateway"] == {"Mode": "local"}
        assert all(e["Meta"] == {"managed-by": "opsctl"} for e in found.values())


def test_the_ingress_has_a_listener_per_routed_service_in_the_colours_block():
    ctx = Context(spec.load(None), "local", Path("/nonexistent/.opsctl"))
    listeners = entries("green")[("ingress-gateway", INGRESS)]["Listeners"]
    assert [(l["Port"], l["Services"][0]["Name"]) for l in listeners] == [
        (ctx.address("mesh", "ingress/order-creator", "green").port, "order-creator"),
        (ctx.address("mesh", "ingress/stock-service", "green").port, "stock-service")]


def test_a_service_registers_with_its_health_check_and_its_sidecar_upstreams():
    ctx = Context(spec.load(None), "local", Path("/nonexistent/.opsctl"))
    body = registration(ctx, "order-creator", "green")
    assert body["Port"] == ctx.address("order-creator", colour="green").port
    assert body["Check"]["HTTP"].endswith("/health") and body["Check"]["Interval"] == "1s"
    (upstream,) = body["Connect"]["SidecarService"]["Proxy"]["Upstreams"]
    assert upstream["DestinationName"] == "stock-service"
    assert upstream["LocalBindPort"] == ctx.address("mesh", "order-creator/upstream/stock-service", "green").port
    worker = registration(ctx, "cdc-bridge", "blue")
    assert worker["Check"]["HTTP"].endswith("/metrics") and "Connect" not in worker


def test_what_consul_adds_to_an_entry_is_not_drift_but_a_missing_source_is():
    wanted = {"Kind": "service-intentions", "Name": "s", "Sources": [{"Name": "a", "Action": "allow"}]}
    held = {**wanted, "CreateIndex": 9, "Sources": [{"Name": "a", "Action": "allow", "Precedence": 9}]}
    assert _covers(held, wanted)
    assert not _covers({**held, "Sources": []}, wanted)
    assert not _covers({**held, "Sources": held["Sources"] * 2}, wanted)


def test_reads_are_retried_through_a_failover_and_writes_only_when_they_reached_no_proxy():
    routes = entries("green")[("service-router", "order-creator")]["Routes"]
    reads, others = routes
    assert reads["Match"] == {"HTTP": {"Methods": ["GET", "HEAD"]}}
    assert "gateway-error" in reads["Destination"]["RetryOn"]
    assert "Match" not in others  # every other method: a POST may have placed its order
    assert set(others["Destination"]["RetryOn"]) <= {"connect-failure", "refused-stream"}


def test_every_proxy_takes_out_a_failing_instance_even_the_only_one_of_its_colour():
    from opsctl.components.mesh import Sidecar

    ctx = Context(spec.load(None), "local", Path("/nonexistent/.opsctl"))
    argv = Sidecar("stock-service", ctx, "green").argv()
    overlay = json.loads(argv[argv.index("--config-yaml") + 1])
    runtime = overlay["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime["outlier_detection.max_ejection_percent"] == 100  # Envoy's 10 % would never eject it
    assert runtime["outlier_detection.enforcing_consecutive_gateway_failure"] == 100
