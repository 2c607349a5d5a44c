"""Every step opsctl runs and the code that runs it, in one place.

platform.yaml numbers the components (what the platform is made of); the configuration
steps follow them, in the order below. Strings only, so that importing this stays fast.
"""

from __future__ import annotations

# spec component -> its implementation (None: nothing runs it on any target yet)
COMPONENTS = {
    "kind": "opsctl.components.kind:Kind",
    "metallb": "opsctl.components.metallb:Metallb",
    "nginx": "opsctl.components.nginx:Nginx",
    "prometheus-grafana": "opsctl.components.prometheus:Prometheus",
    "rabbitmq": "opsctl.components.rabbitmq:RabbitMQ",
    "cert-manager": None,
    "consul": "opsctl.components.consul:Consul",
    "mongodb": "opsctl.components.mongodb:MongoDB",
    "postgres": "opsctl.components.postgres:Postgres",
    "vault": "opsctl.components.vault:Vault",
    "registry": None,
    "redis": "opsctl.components.redis:Redis",
    "kafka": "opsctl.components.kafka:Kafka",
    "spark": "opsctl.components.spark:Spark",
    "keycloak": "opsctl.components.keycloak:Keycloak",
    "airflow": None,
}

# Steps that configure the running servers, numbered after the components.
CONFIGURATION = {
    "keycloak-realm": "opsctl.components.keycloak_realm:KeycloakRealm",
    "vault-auth": "opsctl.components.vault_config:VaultAuth",
    "service-credentials": "opsctl.components.credentials:ServiceCredentials",
    "rabbitmq-topology": "opsctl.components.rabbitmq_topology:RabbitMQTopology",
    "stock-catalogue": "opsctl.components.stock_catalogue:StockCatalogue",
    "consul-config": "opsctl.components.mesh:MeshConfig",
    "services": "opsctl.components.services:Services",
}


def step_number(spec, name: str) -> int:
    """Step `name`'s number: the spec's for a component, else after the last component."""
    if name in spec.components:
        return spec.components[name].step
    return max(c.step for c in spec.components.values()) + 1 + list(CONFIGURATION).index(name)
