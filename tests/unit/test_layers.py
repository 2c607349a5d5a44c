"""The seams a newcomer relies on: components know no target, the engine no local machinery,
every target answers through the same interface, and no module grows past a screen-full."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from opsctl import spec
from opsctl.components import build
from opsctl.components.base import Skipped
from opsctl.context import Context
from opsctl.errors import USAGE, UsageError

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def offenders(files, forbidden: str) -> dict[str, list[str]]:
    found = {p.name: sorted(m for m in imports(p) if m == forbidden or m.startswith(forbidden + "."))
             for p in files}
    return {name: modules for name, modules in found.items() if modules}


@pytest.mark.parametrize("folder,forbidden", [("components", "opsctl.targets"),
                                              ("engine", "opsctl.targets.local"),
                                              ("app", "opsctl.ui"), ("app", "opsctl.commands")])
def test_a_layer_does_not_import_across_its_seam(folder, forbidden):
    assert not offenders(sorted((ROOT / "opsctl" / folder).glob("*.py")), forbidden)


@pytest.mark.parametrize("command", sorted(p.stem for p in (ROOT / "opsctl" / "commands").glob("*.py")))
def test_a_command_reaches_components_and_targets_only_through_the_application_layer(command):
    path = ROOT / "opsctl" / "commands" / f"{command}.py"
    assert not offenders([path], "opsctl.components") and not offenders([path], "opsctl.targets")
    assert not offenders([path], "opsctl.engine")


def test_no_module_is_over_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for folder in ("opsctl", "services/order_services", "tests", "scripts") for p in (ROOT / folder).rglob("*.py")}
    assert not {path: n for path, n in sizes.items() if n > 500}


def test_every_package_says_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for folder in ("opsctl", "services/order_services")
               for p in (ROOT / folder).rglob("__init__.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing


def test_on_the_kubernetes_target_only_servers_with_a_chart_are_steps(tmp_path):
    ctx = Context(spec.load(None), "kubernetes", tmp_path / ".opsctl")
    assert {build(n, ctx).release().chart for n in ("redis", "rabbitmq", "kafka", "vault")} == {"data-service"}
    registry, mesh = build("registry", ctx), build("consul-config", ctx)
    assert isinstance(registry, Skipped) and registry.reason == "not yet on this target"
    assert isinstance(mesh, Skipped) and "Consul CRs" in mesh.reason
    consul = build("consul", ctx).release()  # an add-on: its upstream chart, this cluster's datacenter
    assert consul.upstream.name == "hashicorp/consul" and consul.values["global"]["datacenter"] == "dc1"
    edge = build("nginx", ctx)  # ingress-nginx, with the local edge's limits
    config = edge.release().values["controller"]["config"]
    assert edge.release().upstream.name == "ingress-nginx/ingress-nginx"
    assert (config["proxy-body-size"], config["proxy-next-upstream"]) == ("64k", "off")
    assert edge.endpoint() == "nginx.opsctl-edge.svc.cluster.local:8088"
    (tmp_path / "opsctl.yaml").write_text("components: {nginx: {chart: {values: {controller: "
                                           "{config: {proxy-body-size: 1m}}}}}}")
    written = Context(spec.load(tmp_path / "opsctl.yaml"), "kubernetes", tmp_path / ".opsctl")
    assert build("nginx", written).release().values["controller"]["config"]["proxy-body-size"] == "1m"  # it wins
    assert not isinstance(build("services", ctx), Skipped)  # a release per service
    assert build("spark", ctx).servers()[0].release().chart == "spark-job"  # the driver's account; jobs stream submits
    assert str(ctx.address("redis", "redis")) == "redis.opsctl-data.svc.cluster.local:6379"
    assert str(ctx.address("order-creator")) == "order-creator.opsctl-services.svc.cluster.local:8001"
    assert str(ctx.address("mesh", "order-creator/upstream/stock-service")) == "127.0.0.1:8002"
    with pytest.raises(UsageError):
        ctx.address("mesh", "mesh-gateway", "blue")
    assert not (tmp_path / ".opsctl").exists()  # nothing was written


def test_the_mesh_entries_become_the_consul_k8s_resources_of_the_same_meaning():
    from opsctl.components.service_releases import custom_resource

    intention = custom_resource({"Kind": "service-intentions", "Name": "*", "Meta": {"managed-by": "opsctl"},
                                 "Sources": [{"Name": "*", "Action": "deny"}]})
    assert (intention["kind"], intention["metadata"]["name"]) == ("ServiceIntentions", "all-services")
    assert intention["spec"] == {"destination": {"name": "*"}, "sources": [{"name": "*", "action": "deny"}]}
    router = custom_resource({"Kind": "service-router", "Name": "stock-service", "Routes": [
        {"Match": {"HTTP": {"Methods": ["GET"]}}, "Destination": {"NumRetries": 3, "RetryOn": ["reset"]}}]})
    assert router["spec"]["routes"][0] == {"match": {"http": {"methods": ["GET"]}},
                                           "destination": {"numRetries": 3, "retryOn": ["reset"]}}
    resolver = custom_resource({"Kind": "service-resolver", "Name": "x", "ConnectTimeout": "2s",
                                "Failover": {"*": {"Targets": [{"Peer": "dc2"}]}}})
    assert resolver["spec"] == {"connectTimeout": "2s", "failover": {"*": {"targets": [{"peer": "dc2"}]}}}


def test_the_kubernetes_target_needs_a_kubeconfig(tmp_path):
    ctx = Context(spec.load(None), "kubernetes", tmp_path / ".opsctl", False, {"kubeconfig": str(tmp_path / "none")})
    with pytest.raises(UsageError) as info:
        ctx.runtime.check_available()
    assert info.value.code == USAGE and "no kubeconfig at" in info.value.message


def test_the_local_target_says_where_each_component_answers(tmp_path):
    ctx = Context(spec.load(None), "local", tmp_path / ".opsctl")
    assert str(ctx.address("rabbitmq", "management")) == "127.0.0.1:15672"
    assert ctx.runtime.name == "local"
    with pytest.raises(KeyError):
        ctx.address("rabbitmq", "nope")
