"""The bundled order services (package order_services, see docs/ORDER_FLOW.md) as servers
the target runs: their environment, built from each one's wiring in the spec's `services:`.

Each service gets its settings as environment variables and logs in to Vault by itself
for its credentials; the one secret it is handed is its own Keycloak client secret
(read from Vault here), as a Kubernetes Secret would hand it in a pod.
"""

from __future__ import annotations

import sys
from opsctl import httpclient
from opsctl.components import keycloak_realm, vault
from opsctl.components.base import Component, Server, Outcome
from opsctl.context import Context
from opsctl.errors import OpsError
from opsctl.net import port_open
from opsctl.registry import step_number
from opsctl.spec import Component as ComponentSpec

def environment(ctx: Context, name: str, client_secret: str) -> dict[str, str]:
    """Everything service `name` needs to run, as environment variables."""
    spec, names = ctx.spec, ctx.spec.names
    rabbitmq, postgres, redis = (ctx.address(*at) for at in
                                 (("rabbitmq", "amqp"), ("postgres", "postgres"), ("redis", "redis")))
    env = {
        "SERVICE_NAME": name,
        "OIDC_TOKEN_URL": keycloak_realm.token_url(ctx),
        "OIDC_CLIENT_ID": name,
        "OIDC_CLIENT_SECRET": client_secret,
        "OIDC_ISSUER": keycloak_realm.issuer(ctx),
        "OIDC_AUDIENCE": names.keycloak.order_api_audience,
        "OIDC_CLIENT": names.keycloak.client,
        "OIDC_REQUIRED_ROLE": names.keycloak.client_role,
        "VAULT_ADDR": vault.address(ctx),
        "VAULT_ROLE": name,
        "VAULT_SECRET_PATH": name,
        "VAULT_JWT_PATH": names.vault.jwt_path,
        "VAULT_KV_MOUNT": names.vault.kv_mount,
        "RABBITMQ_HOST": rabbitmq.host,
        "RABBITMQ_PORT": str(rabbitmq.port),
        "ORDER_EXCHANGE": names.exchanges.orders,
        "DELIVERY_ATTEMPTS": str(spec.rabbitmq.delivery_attempts),
        "POSTGRES_HOST": postgres.host,
        "POSTGRES_PORT": str(postgres.port),
        "POSTGRES_DB": names.postgres.database,
        "MONGODB_URL": ctx.address("mongodb", "mongo").url(f"/?replicaSet={names.mongodb.replica_set}",
                                                           scheme="mongodb"),
        "MONGODB_DB": names.mongodb.database,
        "REDIS_HOST": redis.host,
        "REDIS_PORT": str(redis.port),
        "KAFKA_BOOTSTRAP": str(ctx.address("kafka", "broker")),
        "KAFKA_TOPIC": names.topics.orders,
        "STATE_DIR": str(ctx.local_dir(name) / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    service = spec.services[name]
    # Service-to-service calls (the order creator's to the stock service): the caller gets
    # the URL, the callee the clients it admits; both the audience and the role they check.
    callers = [other for other, s in spec.services.items() if name in s.calls]
    if service.calls or callers:
        env["STOCK_SERVICE_AUDIENCE"] = names.keycloak.stock_api_audience
        env["STOCK_SERVICE_ROLE"] = names.keycloak.service_role  # what the caller's account holds
    if "stock-service" in service.calls:
        env["STOCK_URL"] = ctx.address("stock-service").url()
    if callers:
        env["STOCK_SERVICE_CLIENTS"] = ",".join(callers)
    if service.port:
        env.update(HTTP_HOST=ctx.host, HTTP_PORT=str(service.port))
    else:
        env.update(METRICS_HOST=ctx.host, METRICS_PORT=str(service.metrics_port))
    if service.store:
        env["STORE"] = service.store
    if service.collection:
        env["MONGODB_COLLECTION"] = getattr(names.mongodb, service.collection)
    if service.consumes:
        env["QUEUE"] = getattr(names.queues, service.consumes)
        env["DEAD_LETTER_EXCHANGE"] = names.exchanges.dead_letter  # where a consumer dead-letters
    if service.runtime == "spark":
        from opsctl.components import spark
        from opsctl.components.rabbitmq_topology import VALIDATION_KEY

        env.update(MODEL_DIR=str(spark.model_dir(ctx)), VALIDATION_ROUTING_KEY=VALIDATION_KEY,
                   TRIGGER_SECONDS=f"{spec.screening.trigger_seconds:g}", **spark.driver_env(ctx))
    return env


class BundledService(Server):
    """One service of the order flow, run as `python -m <module>`."""

    ready_timeout = 60.0

    def __init__(self, name: str, ctx: Context, client_secret: str | None = None):
        self._client_secret = client_secret
        super().__init__(name, ctx)

    def _component_spec(self) -> ComponentSpec:
        return ComponentSpec(step=step_number(self.ctx.spec, "services"), version="bundled",
                             ports=self.ctx.spec.services[self.name].ports)

    # Never started (installed with --skip services) is not down; stopped or failed is. The
    # streaming job, started on demand, is not down when stopped either.
    never_started_health = "n/a"

    @property
    def stopped_health(self) -> str:
        return "stopped" if self.ctx.spec.services[self.name].autostart else "n/a"

    def port_setting(self, key: str) -> str:
        field = "port" if key == "http" else "metrics_port"
        return f"services:\n    {self.name}: {{{field}: <free port>}}"

    @property
    def stop_group(self) -> bool:
        # The streaming job's driver finishes the batch in hand on SIGTERM; its JVM must not
        # get the signal too, or it stops the SparkContext under that batch.
        return self.ctx.spec.services[self.name].runtime != "spark"

    @property
    def module(self) -> str:
        return self.ctx.spec.services[self.name].module

    def check_installed(self) -> None:
        import importlib.util

        if importlib.util.find_spec(self.module) is None:
            raise OpsError(f"the {self.name} service is not installed",
                           "install the services: .venv/bin/pip install -e services")

    def env(self) -> dict[str, str]:
        secret = self._client_secret or "(read from Vault at start)"
        return environment(self.ctx, self.name, secret)

    def initialise(self) -> None:
        self.path("state").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def endpoint(self) -> str:
        return self.ctx.address(self.name).url()

    def probe(self) -> bool:
        if not port_open(self.ctx.address(self.name)):
            return False
        path = "/health" if "http" in self.spec.ports else "/metrics"
        return httpclient.answers(f"{self.endpoint()}{path}", timeout=1)


class Services(Component):
    """Install step: every bundled service running with the spec's settings."""

    after = ("rabbitmq-topology", "service-credentials", "keycloak-realm", "vault-auth",
             "stock-catalogue", "kafka", "mongodb")

    def _component_spec(self) -> None:
        return None

    def servers(self) -> list[BundledService]:
        """The services with their client secrets (a plan reads them too, so that it compares
        like with like; reading changes nothing)."""
        client = vault.admin(self.ctx)
        return [BundledService(name, self.ctx, keycloak_realm.client_secret(self.ctx, name, client))
                for name, service in self.ctx.spec.services.items() if service.autostart]

    def reconcile(self) -> Outcome:
        outcomes = [(server.name, server.reconcile()) for server in self.servers()]
        changed = [f"{name} {o.detail}" for name, o in outcomes if o.state in ("changed", "planned")]
        if not changed:
            return Outcome("unchanged", f"{len(outcomes)} services running")
        return Outcome("planned" if self.ctx.dry_run else "changed", "; ".join(changed))

    def stop(self) -> bool:
        return any([BundledService(name, self.ctx).stop() for name in self.ctx.spec.services])
