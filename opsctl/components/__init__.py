"""One module per component; this registry maps spec names to their implementation.

Modules are imported only when a component is used, so `opsctl --help` stays fast.
"""

from __future__ import annotations

import importlib

from opsctl.components.base import Component, Context, LocalServer, Skipped

LOCAL_SERVERS = {
    "nginx": "opsctl.components.nginx:Nginx",
    "prometheus-grafana": "opsctl.components.prometheus:Prometheus",
    "rabbitmq": "opsctl.components.rabbitmq:RabbitMQ",
    "mongodb": "opsctl.components.mongodb:MongoDB",
    "postgres": "opsctl.components.postgres:Postgres",
    "vault": "opsctl.components.vault:Vault",
    "redis": "opsctl.components.redis:Redis",
    "kafka": "opsctl.components.kafka:Kafka",
    "keycloak": "opsctl.components.keycloak:Keycloak",
}


def build(name: str, ctx: Context) -> Component:
    spec = ctx.spec.components[name]
    if ctx.target not in spec.targets:
        return Skipped(name, ctx, f"{'/'.join(spec.targets)} only")
    if not spec.available:
        return Skipped(name, ctx, "not yet (lands with the AI screening issue)")
    module, _, cls = LOCAL_SERVERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(name, ctx)


def all_components(ctx: Context) -> list[Component]:
    return [build(name, ctx) for name, _ in ctx.spec.ordered()]


def local_servers(ctx: Context) -> list[LocalServer]:
    """The components that run as local processes on this target."""
    return [c for c in all_components(ctx) if isinstance(c, LocalServer)]
