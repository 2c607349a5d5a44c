"""One module per component, found through opsctl.registry: its desired state, health
checks and users. A component imports no target and no command; where it runs is the
target's (ctx.runtime), and base.py is the interface both sides share.

Modules are imported only when a component is used, so `opsctl --help` stays fast.
"""

from __future__ import annotations

import importlib

from opsctl.components.base import Component, Server, Skipped
from opsctl.context import Context
from opsctl.registry import COMPONENTS, CONFIGURATION


def _load(path: str):
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


NOT_YET = "not yet on this target"


def build(name: str, ctx: Context) -> Component:
    if name in CONFIGURATION:
        step = _load(CONFIGURATION[name])
        if ctx.target == "kubernetes" and not getattr(step, "on_kubernetes", False):
            return Skipped(name, ctx, getattr(step, "on_a_cluster_instead", NOT_YET))
        return step(name, ctx)
    spec = ctx.spec.components[name]
    if ctx.target not in spec.targets:
        return Skipped(name, ctx, f"{'/'.join(spec.targets)} only")
    implementation = _load(COMPONENTS[name]) if COMPONENTS[name] else None
    own = getattr(implementation, "on_kubernetes", False)  # the class itself acts on a cluster
    if ctx.target == "kubernetes" and spec.chart and not own:
        from opsctl.components.addons import Addon

        return Addon(name, ctx)  # its upstream chart
    if not spec.available or implementation is None:
        return Skipped(name, ctx, NOT_YET)
    if ctx.target == "kubernetes" and not own and getattr(implementation, "release", Server.release) is Server.release:
        return Skipped(name, ctx, NOT_YET)  # it has no release() of its own (a chart) yet
    return implementation(name, ctx)


def infrastructure(ctx: Context) -> list[Component]:
    """The sixteen numbered components, in order."""
    return [build(name, ctx) for name, _ in ctx.spec.ordered()]


def all_steps(ctx: Context) -> list[Component]:
    """Everything install runs: the components, then the configuration steps."""
    return infrastructure(ctx) + [build(name, ctx) for name in CONFIGURATION]


def servers(ctx: Context) -> list[Component]:
    """The components that run servers on the target (processes on the local target): a
    Server, or a component of several (Consul's agents)."""
    return [c for c in infrastructure(ctx) if not isinstance(c, Skipped)]
