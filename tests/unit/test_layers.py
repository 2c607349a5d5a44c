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
    assert build("redis", ctx).release().chart == "data-service"
    for name in ("rabbitmq", "consul", "kind", "services", "keycloak-realm"):
        skipped = build(name, ctx)
        assert isinstance(skipped, Skipped) and skipped.reason == "not yet on this target"
    assert str(ctx.address("redis", "redis")) == "redis.opsctl-data.svc.cluster.local:6379"
    with pytest.raises(UsageError):
        ctx.address("mesh", "ingress/order-creator", "blue")
    assert not (tmp_path / ".opsctl").exists()  # nothing was written


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
