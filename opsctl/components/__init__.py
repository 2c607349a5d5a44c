"""One module per component; this registry maps spec names to their implementation.

Modules are imported only when a component is used, so `opsctl --help` stays fast.
"""

from __future__ import annotations

import importlib

from opsctl.components.base import Component, Context, LocalServer, Skipped

LOCAL_TARGET = {  # what runs each component on the local target (servers, and Spark as a library)
    "nginx": "opsctl.components.nginx:Nginx",
    "prometheus-grafana": "opsctl.components.prometheus:Prometheus",
    "rabbitmq": "opsctl.components.rabbitmq:RabbitMQ",
    "mongodb": "opsctl.components.mongodb:MongoDB",
    "postgres": "opsctl.components.postgres:Postgres",
    "vault": "opsctl.components.vault:Vault",
    "redis": "opsctl.components.redis:Redis",
    "kafka": "opsctl.components.kafka:Kafka",
    "spark": "opsctl.components.spark:Spark",
    "keycloak": "opsctl.components.keycloak:Keycloak",
}


# Steps that configure the running servers, after the sixteen infrastructure steps.
CONFIG_STEPS = {
    "keycloak-realm": "opsctl.components.keycloak_realm:KeycloakRealm",
    "vault-auth": "opsctl.components.vault_config:VaultAuth",
    "service-credentials": "opsctl.components.credentials:ServiceCredentials",
    "rabbitmq-topology": "opsctl.components.rabbitmq_topology:RabbitMQTopology",
    "stock-catalogue": "opsctl.components.stock_catalogue:StockCatalogue",
    "services": "opsctl.components.services:Services",
}


def _load(path: str):
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


def build(name: str, ctx: Context) -> Component:
    if name in CONFIG_STEPS:
        return _load(CONFIG_STEPS[name])(name, ctx)
    spec = ctx.spec.components[name]
    if ctx.target not in spec.targets:
        return Skipped(name, ctx, f"{'/'.join(spec.targets)} only")
    if not spec.available:
        return Skipped(name, ctx, "not yet on this target")
    return _load(LOCAL_TARGET[name])(name, ctx)


def infrastructure(ctx: Context) -> list[Component]:
    """The sixteen numbered components, in order."""
    return [build(name, ctx) for name, _ in ctx.spec.ordered()]


def all_steps(ctx: Context) -> list[Component]:
    """Everything install runs: the components, then the configuration steps."""
    return infrastructure(ctx) + [build(name, ctx) for name in CONFIG_STEPS]


def local_servers(ctx: Context) -> list[LocalServer]:
    """The components that run as local processes on this target."""
    return [c for c in infrastructure(ctx) if isinstance(c, LocalServer)]
