"""Where each component and service answers: one place (Context.address) that follows the
spec, so moving a port or the bind address in opsctl.yaml moves every client with it."""

import pytest

from opsctl import spec
from opsctl.components import build, keycloak_realm, nginx, services, vault
from opsctl.context import Context


@pytest.fixture
def moved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPSCTL_CONFIG", raising=False)
    (tmp_path / "opsctl.yaml").write_text(
        "platform: {bind_address: 127.0.0.2}\n"
        "components:\n"
        "  rabbitmq: {ports: {amqp: 5999, management: 15999}}\n"
        "  mongodb: {ports: {mongo: 27999}}\n"
        "  vault: {ports: {http: 8999}}\n"
        "  keycloak: {ports: {http: 8998}}\n"
        "  nginx: {ports: {http: 8997}}\n"
        "services:\n"
        "  stock-service: {port: 9999}\n"
        "  regular-consumer: {metrics_port: 9998}\n"
        "mesh: {ports_from: {blue: 23000, green: 23100}}\n")
    return Context(spec.load(None), "local", tmp_path / ".opsctl")


def test_addresses_follow_the_spec_ports_and_bind_address(moved):
    assert str(moved.address("rabbitmq", "management")) == "127.0.0.2:15999"
    assert str(moved.address("rabbitmq")) == "127.0.0.2:5999"  # no port named: the first
    assert moved.address("regular-consumer").url("/metrics") == "http://127.0.0.2:9998/metrics"
    assert vault.address(moved) == "http://127.0.0.2:8999"
    assert keycloak_realm.token_url(moved).startswith("http://127.0.0.2:8998/realms/")
    assert nginx.edge_url(moved) == "http://127.0.0.2:8997"
    assert build("rabbitmq", moved).endpoint() == "amqp://127.0.0.2:5999"
    assert build("mongodb", moved).endpoint() == "mongodb://127.0.0.2:27999"


def test_a_service_is_wired_to_where_the_others_answer(moved):
    env = services.environment(moved, "order-creator", "secret")
    assert (env["RABBITMQ_HOST"], env["RABBITMQ_PORT"]) == ("127.0.0.2", "5999")
    assert env["MONGODB_URL"].startswith("mongodb://127.0.0.2:27999/?replicaSet=")
    assert env["STOCK_URL"] == "http://127.0.0.2:23022"  # its sidecar's upstream, in blue's mesh block
    assert env["VAULT_ADDR"] == "http://127.0.0.2:8999"
    green = services.environment(moved, "stock-service", "secret", "green")
    assert (green["HTTP_HOST"], green["HTTP_PORT"], green["COLOUR"]) == ("127.0.0.2", "10099", "green")
    worker = services.environment(moved, "regular-consumer", "secret")
    assert (worker["METRICS_HOST"], worker["METRICS_PORT"]) == ("127.0.0.2", "9998")
    assert "COLOUR" not in worker  # one copy for both colours: a switch does not restart it
    # The edge sends to its switch, the switch the stock routes to each colour's ingress listener.
    edge = build("nginx", moved)
    assert f"server 127.0.0.2:{edge.switch.port('http')};" in edge.config_files()["nginx.conf"]
    clusters = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                for c in edge.switch.clusters()["resources"]}
    assert clusters["stock-service-blue"]["socket_address"] == {"address": "127.0.0.2", "port_value": 23011}
    assert clusters["stock-service-green"]["socket_address"]["port_value"] == 23111
    scraped = build("prometheus-grafana", moved).config_files()["prometheus.yml"]
    assert all(f"127.0.0.2:{port}" in scraped for port in (9998, 9999, 10099))


def test_an_ipv6_host_is_bracketed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "opsctl.yaml").write_text("platform: {bind_address: '::1'}\n")
    ctx = Context(spec.load(None), "local", tmp_path / ".opsctl")
    assert ctx.address("vault", "http").url() == f"http://[::1]:{ctx.spec.components['vault'].ports['http']}"


def test_a_port_a_component_does_not_have_is_a_programming_error(moved):
    with pytest.raises(KeyError):
        moved.address("redis", "management")
    with pytest.raises(KeyError):
        moved.address("no-such-thing")
