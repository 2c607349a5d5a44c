"""The bundled order services (package order_services, see docs/ORDER_FLOW.md) as servers
the target runs: their environment, built from each one's wiring in the spec's `services:`.

Each service gets its settings as environment variables and logs in to Vault by itself
for its credentials; the one secret it is handed is its own Keycloak client secret
(read from Vault here), as a Kubernetes Secret would hand it in a pod.
"""

from __future__ import annotations

from opsctl import httpclient
from opsctl.components import keycloak_realm, vault
from opsctl.components.base import Component, Health, Outcome, Server
from opsctl.context import Context
from opsctl.errors import OpsError
from opsctl.net import port_open
from opsctl.registry import step_number
from opsctl.spec import Component as ComponentSpec

def environment(ctx: Context, name: str, client_secret: str, colour: str = "blue") -> dict[str, str]:
    """Everything service `name` (of `colour`) needs to run, as environment variables."""
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
        "STATE_DIR": str(ctx.local_dir(server_name(ctx, name, colour)) / "state"),
        "PYTHONUNBUFFERED": "1",
    }
    service = spec.services[name]
    if service.per_colour:  # not a worker's: it serves whichever colour is live, and a switch
        env["COLOUR"] = colour  # that changes nothing else of it does not restart it
    # Service-to-service calls (the order creator's to the stock service): the caller gets
    # the URL, the callee the clients it admits; both the audience and the role they check.
    callers = [other for other, s in spec.services.items() if name in s.calls]
    if service.calls or callers:
        env["STOCK_SERVICE_AUDIENCE"] = names.keycloak.stock_api_audience
        env["STOCK_SERVICE_ROLE"] = names.keycloak.service_role  # what the caller's account holds
    if "stock-service" in service.calls:  # through its sidecar: the mesh finds an instance
        env["STOCK_URL"] = ctx.address("mesh", f"{name}/upstream/stock-service", colour).url()
    if callers:
        env["STOCK_SERVICE_CLIENTS"] = ",".join(callers)
    port = str(ctx.address(name, colour=colour).port)
    if service.port:
        env.update(HTTP_HOST=ctx.host, HTTP_PORT=port)
    else:
        env.update(METRICS_HOST=ctx.host, METRICS_PORT=port)
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


def server_name(ctx: Context, name: str, colour: str) -> str:
    """order-creator-blue for an HTTP service's copy in a colour; a worker is its name."""
    return f"{name}-{colour}" if ctx.spec.services[name].per_colour else name


class BundledService(Server):
    """One service of the order flow, run as `python -m <module>`: an HTTP service in each
    colour (`colour`), a worker once, on the live colour's build (the default colour)."""

    ready_timeout = 60.0

    def __init__(self, name: str, ctx: Context, client_secret: str | None = None,
                 colour: str | None = None):
        from opsctl.components import live

        self._client_secret = client_secret
        self.service = name
        per_colour = ctx.spec.services[name].per_colour
        if per_colour and colour is None:
            raise ValueError(f"{name} runs in each colour: say which")  # a bug, not a user error
        self.colour = colour or live.colour(ctx)
        super().__init__(server_name(ctx, name, self.colour), ctx)

    def _component_spec(self) -> ComponentSpec:
        key = "http" if self.ctx.spec.services[self.service].port else "metrics"
        return ComponentSpec(step=step_number(self.ctx.spec, "services"), version="bundled",
                             ports={key: self.address().port})

    def address(self, port: str = ""):
        return self.ctx.address(self.service, colour=self.colour)

    @property
    def sidecar(self):
        """Its Envoy in the colour's mesh (HTTP services), else None."""
        from opsctl.components.mesh import Sidecar

        return Sidecar(self.service, self.ctx, self.colour) if self.ctx.spec.services[self.service].per_colour else None

    def converge(self) -> str | None:
        from opsctl.components.mesh import register

        return register(self.ctx, self.service, self.colour)

    # An HTTP service runs with its sidecar: started after it, stopped before it, and
    # reported with it.
    def reconcile(self) -> Outcome:
        outcome = super().reconcile()
        sidecar = self.sidecar
        if sidecar is None:
            return outcome
        proxied = sidecar.reconcile()
        if proxied.state not in ("changed", "planned"):
            return outcome
        details = [outcome.detail] if outcome.state in ("changed", "planned") else []
        return Outcome(proxied.state, "; ".join(details + [f"sidecar {proxied.detail}"]))

    def health(self) -> Health:
        health = super().health()
        sidecar = self.sidecar
        if sidecar is None or not health.ok:
            return health
        proxied = sidecar.health()
        if not proxied.ok:
            health.health, health.detail = "unhealthy", f"sidecar {proxied.health}: {proxied.detail}"
        return health

    def stop(self) -> bool:
        """Stopped on purpose, it leaves the mesh (one that dies stays registered, critical:
        the mesh fails over from it)."""
        from opsctl.components.mesh import deregister

        sidecar = self.sidecar
        stopped = any([sidecar.stop() if sidecar else False, super().stop()])
        if stopped:
            deregister(self.ctx, self.service, self.colour)
        return stopped

    def purge(self) -> None:
        if self.sidecar:
            self.sidecar.purge()
        super().purge()

    # Never started (installed with --skip services) is not down; stopped or failed is. The
    # streaming job, started on demand, is not down when stopped either.
    never_started_health = "n/a"

    @property
    def stopped_health(self) -> str:
        return "stopped" if self.ctx.spec.services[self.service].autostart else "n/a"

    def port_setting(self, key: str) -> str:
        field = "port" if key == "http" else "metrics_port"
        if self.colour != "blue" and key == "http":
            return f"mesh:\n    port_offset: {{{self.colour}: <another offset>}}"
        return f"services:\n    {self.service}: {{{field}: <free port>}}"

    @property
    def stop_group(self) -> bool:
        # The streaming job's driver finishes the batch in hand on SIGTERM; its JVM must not
        # get the signal too, or it stops the SparkContext under that batch.
        return self.ctx.spec.services[self.service].runtime != "spark"

    @property
    def module(self) -> str:
        return self.ctx.spec.services[self.service].module

    def check_installed(self) -> None:
        import importlib.util

        from opsctl.components import builds

        if builds.record(self.ctx, self.colour) is None and importlib.util.find_spec(self.module) is None:
            raise OpsError(f"the {self.name} service is not installed",
                           "install the services: .venv/bin/pip install -e services")

    def env(self) -> dict[str, str]:
        secret = self._client_secret or "(read from Vault at start)"
        return environment(self.ctx, self.service, secret, self.colour)

    def initialise(self) -> None:
        self.path("state").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        from opsctl.components import builds

        return [builds.python(self.ctx, self.colour), "-m", self.module]  # the colour's build

    def endpoint(self) -> str:
        return self.address().url()

    def probe(self) -> bool:
        if not port_open(self.address()):
            return False
        path = "/health" if "http" in self.spec.ports else "/metrics"
        return httpclient.answers(f"{self.endpoint()}{path}", timeout=1)


class Services(Component):
    """Install step: every bundled service running with the spec's settings."""

    after = ("rabbitmq-topology", "service-credentials", "keycloak-realm", "vault-auth",
             "stock-catalogue", "kafka", "mongodb")

    on_kubernetes = True  # there: a release per service (service_releases.py)

    def _component_spec(self) -> None:
        return None

    def started(self) -> list[BundledService]:
        """The services install starts, with their client secrets (a plan reads them too, so
        that it compares like with like; reading changes nothing)."""
        client, spec = vault.admin(self.ctx), self.ctx.spec
        called = {callee for s in spec.services.values() for callee in s.calls}
        # What others call starts first: the order API finds the stock service at its start.
        names = sorted((n for n, s in spec.services.items() if s.autostart), key=lambda n: n not in called)
        return [instance for name in names
                for instance in instances(self.ctx, name, keycloak_realm.client_secret(self.ctx, name, client))]

    def servers(self) -> list[Server]:
        """Every instance with its sidecar (on the kubernetes target: every release)."""
        if self.ctx.target == "kubernetes":
            from opsctl.components.service_releases import releases

            return releases(self.ctx)
        found = []
        for instance in self.started():
            found += [instance] + ([instance.sidecar] if instance.sidecar else [])
        return found

    def reconcile(self) -> Outcome:
        if self.ctx.target == "kubernetes":  # independent releases, each waited for: all at once
            from concurrent.futures import ThreadPoolExecutor

            releases = self.servers()
            with ThreadPoolExecutor(max_workers=len(releases)) as pool:
                outcomes = list(zip([r.name for r in releases], pool.map(lambda r: r.reconcile(), releases)))
        else:
            outcomes = [(server.name, server.reconcile()) for server in self.started()]
        changed = [f"{name} {o.detail}" for name, o in outcomes if o.state in ("changed", "planned")]
        if not changed:
            return Outcome("unchanged", f"{len(outcomes)} services running")
        return Outcome("planned" if self.ctx.dry_run else "changed", "; ".join(changed))

    def stop(self) -> bool:
        return any([s.stop() for s in every_instance(self.ctx)])


def every_instance(ctx: Context) -> list[BundledService]:
    """Every service's every instance (install's and the streaming job); on the kubernetes
    target, the releases of step services."""
    if ctx.target == "kubernetes":
        from opsctl.components.service_releases import releases

        return releases(ctx)
    return [s for name in ctx.spec.services for s in instances(ctx, name)]


def instances(ctx: Context, name: str, client_secret: str | None = None,
              colour: str | None = None) -> list[BundledService]:
    """Service `name` as it runs: an HTTP service in each colour (or in `colour`), a worker once."""
    if not ctx.spec.services[name].per_colour:
        return [BundledService(name, ctx, client_secret)]
    colours = [colour] if colour else list(ctx.spec.mesh.datacenters)
    return [BundledService(name, ctx, client_secret, c) for c in colours]
