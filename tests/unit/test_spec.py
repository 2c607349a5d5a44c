"""The spec loader: defaults, overrides, and errors a user can act on."""

import pytest

from opsctl import registry, spec
from opsctl.errors import USAGE, UsageError


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPSCTL_CONFIG", raising=False)
    return tmp_path


def error_of(workdir, text: str) -> UsageError:
    (workdir / "opsctl.yaml").write_text(text)
    with pytest.raises(UsageError) as info:
        spec.load()
    assert info.value.code == USAGE
    return info.value


def test_default_spec_declares_the_sixteen_steps_in_design_order(workdir):
    s = spec.load()
    assert [name for name, _ in s.ordered()] == list(registry.COMPONENTS)
    assert [c.step for _, c in s.ordered()] == list(range(1, 17))
    assert s.names.realm == "order-management-realm"
    assert s.names.exchanges.orders == "order-exchange"
    assert s.names.topics.orders == "orders-topic"
    assert s.platform.target == "local"


def test_override_is_deep_merged(workdir):
    (workdir / "opsctl.yaml").write_text("components:\n  rabbitmq:\n    ports: {amqp: 5999}\n")
    s = spec.load()
    assert s.components["rabbitmq"].ports["amqp"] == 5999
    assert s.components["rabbitmq"].ports["management"] == 15672  # untouched sibling
    assert s.components["kafka"].version == "4.3.1"


def test_explicit_config_file_wins(workdir):
    other = workdir / "elsewhere.yaml"
    other.write_text("names:\n  realm: other-realm\n")
    assert spec.load(str(other)).names.realm == "other-realm"


def test_bad_field_names_file_path_and_expectation(workdir):
    err = error_of(workdir, "components:\n  rabbitmq:\n    ports: {amqp: lots}\n")
    assert "opsctl.yaml: components.rabbitmq.ports.amqp" in err.message
    assert "integer" in err.message and "'lots'" in err.message


def test_out_of_range_port(workdir):
    err = error_of(workdir, "components:\n  redis:\n    ports: {redis: 70000}\n")
    assert "components.redis.ports.redis" in err.message and "65535" in err.message


def test_unknown_field_is_reported_not_ignored(workdir):
    err = error_of(workdir, "components:\n  kafka:\n    heap: 1g\n")
    assert "components.kafka.heap: unknown field" in err.message


def test_unknown_component(workdir):
    err = error_of(workdir, "components:\n  zookeeper: {step: 17, version: '3'}\n")
    assert "unknown component(s) zookeeper" in err.message


def test_port_used_twice(workdir):
    err = error_of(workdir, "components:\n  kafka:\n    ports: {broker: 6379}\n")
    assert "port 6379 is used twice" in err.message


def test_bad_target(workdir):
    err = error_of(workdir, "platform:\n  target: docker\n")
    assert "platform.target" in err.message and "'docker'" in err.message


def test_yaml_syntax_error_gives_line(workdir):
    err = error_of(workdir, "components:\n  rabbitmq: [unclosed\n")
    assert "opsctl.yaml line" in err.message and "invalid YAML" in err.message


def test_top_level_must_be_mapping(workdir):
    err = error_of(workdir, "- just\n- a list\n")
    assert "expected a mapping" in err.message


def test_missing_explicit_file(workdir):
    with pytest.raises(UsageError, match="cannot read"):
        spec.load(str(workdir / "nope.yaml"))


def test_error_from_default_file_names_default_file(workdir, monkeypatch, tmp_path):
    broken = tmp_path / "platform.yaml"
    broken.write_text(spec.DEFAULT_SPEC.read_text().replace("step: 9", "step: nine"))
    monkeypatch.setattr(spec, "DEFAULT_SPEC", broken)
    with pytest.raises(UsageError) as info:
        spec.load()
    assert f"{broken}: components.postgres.step" in info.value.message


@pytest.mark.parametrize("address", ["0.0.0.0", "192.168.1.10", "::", "example.org"])
def test_non_loopback_bind_address_is_refused_on_the_local_target(workdir, address):
    err = error_of(workdir, f"platform:\n  bind_address: '{address}'\n")
    assert "opsctl.yaml: platform:" in err.message
    assert f"bind_address '{address}' is not a loopback address" in err.message
    assert "use 127.0.0.1" in err.message


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_bind_address_is_accepted(workdir, address):
    (workdir / "opsctl.yaml").write_text(f"platform:\n  bind_address: '{address}'\n")
    assert spec.load().platform.bind_address == address


def test_each_colour_has_a_datacenter_whose_agent_ports_are_all_given(workdir):
    s = spec.load()
    assert s.mesh.datacenters == {"blue": "dc1", "green": "dc2"}
    assert all(port < 32768 for port in s.components["consul"].ports.values())  # not ephemeral
    err = error_of(workdir, "mesh:\n  datacenters: {blue: dc1, green: dc1}\n")
    assert "blue and green need datacenters of their own" in err.message
    err = error_of(workdir, "mesh:\n  datacenters: {red: dc3}\n")
    assert "mesh.datacenters.red" in err.message
    err = error_of(workdir, "mesh:\n  datacenters: {blue: dc1, green: east}\n")
    assert "components.consul.ports needs east_http, east_grpc" in err.message
    err = error_of(workdir, "components:\n  consul:\n    ports: {dc2_dns: 8600}\n")
    assert "port 8600 is used twice" in err.message


def test_each_colour_has_its_own_ports_for_its_services_and_its_mesh(workdir):
    s = spec.load()
    assert s.service_port("order-creator", "blue") == s.services["order-creator"].port
    assert s.service_port("order-creator", "green") == s.services["order-creator"].port + s.mesh.port_offset["green"]
    assert s.service_port("regular-consumer", "green") == s.services["regular-consumer"].metrics_port  # one copy
    blue, green = s.mesh_ports("blue"), s.mesh_ports("green")
    assert set(blue.values()).isdisjoint(green.values())
    assert all(port < 32768 for port in [*blue.values(), *green.values()])  # not ephemeral
    assert "order-creator/upstream/stock-service" in blue and "stock-service/upstream/order-creator" not in blue
    err = error_of(workdir, "mesh:\n  ports_from: {blue: 21000, green: 21050}\n")
    assert "each colour needs 100 ports of its own" in err.message
    err = error_of(workdir, "mesh:\n  port_offset: {blue: 0, green: 0}\n")
    assert "blue and green need different offsets" in err.message
    err = error_of(workdir, "mesh:\n  ports_from: {blue: 8990, green: 21100}\n")
    assert "port 9000 is used twice: keycloak.management and mesh blue" in err.message
    err = error_of(workdir, "services:\n  stock-service: {port: 8101}\n")  # green's order API
    assert "port 8101 is used twice" in err.message


@pytest.mark.parametrize("reference", ["ghcr.io/acme/order-services:1.2.3", "localhost:5000/os:v2", "os:1",
                                       "registry.example.com/a/b_c/d-e:1.0@sha256:" + "a" * 64, "os@sha256:" + "b" * 64])
def test_an_image_reference_with_a_tag_or_digest_is_taken(reference):
    import re

    assert re.fullmatch(spec.IMAGE_REFERENCE, reference)


@pytest.mark.parametrize("reference", ["os", "ghcr.io/acme/os", "OS:1", "os:", "os:1;rm -rf /", "-os:1", "a//b:1",
                                       "os:1 --set x=y", "os:$(id)", "os:1\n", "os@sha256:abc"])
def test_an_image_reference_without_a_tag_or_with_a_stray_character_is_refused(reference):
    import re

    assert not re.fullmatch(spec.IMAGE_REFERENCE, reference)
