"""Loads platform.yaml (shipped) with ./opsctl.yaml over it, and validates the result.

Every mistake is reported with the file it came from, the field path and what is
expected, as a UsageError (exit 2): no traceback for a bad file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opsctl.errors import UsageError

DEFAULT_SPEC = Path(__file__).with_name("platform.yaml")
OVERRIDE_NAME = "opsctl.yaml"

Target = Literal["local", "kubernetes"]
Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:/-]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Platform(Strict):
    name: Name
    target: Target = "local"
    state_dir: str = ".opsctl"
    bind_address: str = "127.0.0.1"

    @model_validator(mode="after")
    def _loopback_only(self) -> "Platform":
        """Kafka, Prometheus and nginx have no authentication on the local target: they must
        never answer on an address other machines can reach."""
        if self.target == "local" and not _loopback(self.bind_address):
            raise ValueError(
                f"bind_address {self.bind_address!r} is not a loopback address: on the local "
                "target it would expose servers without authentication (Kafka, Prometheus) "
                "to the network; use 127.0.0.1 (remove bind_address from opsctl.yaml), or the "
                "kubernetes target to serve other machines")
        return self


class UpstreamChart(Strict):
    """A cluster add-on's own chart, pinned (opsctl/targets/kubernetes/charts.py fetches it)."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9-]+/[a-z0-9-]+$")]  # repository/chart
    version: Annotated[str, Field(pattern=r"^v?[0-9]+\.[0-9]+\.[0-9]+[0-9A-Za-z.+-]*$")]
    repository: Annotated[str, Field(pattern=r"^https://[^\s]+$")]  # the chart repository it is published in
    module: Annotated[str, Field(pattern=r"^[a-z0-9.-]+(/[A-Za-z0-9._-]+)*$")] | None = None
    module_version: str | None = None  # the module's version if it differs from the chart's
    path: str = "."      # the chart's folder in the module
    crds: str | None = None  # a folder of the module whose CRD templates go into the chart
    values: dict = {}


class Component(Strict):
    step: Annotated[int, Field(ge=1, le=99)]
    description: str = ""
    version: Annotated[str, Field(min_length=1)]
    targets: list[Target] = ["local", "kubernetes"]
    available: bool = True
    artifact: str | None = None
    memory: Annotated[str, Field(pattern=r"^[0-9]+[mg]$")] | None = None
    ports: dict[Name, Port] = {}
    image: Name | None = None  # its container image on the kubernetes target, pinned
    chart: UpstreamChart | None = None  # on the kubernetes target: its upstream chart (an add-on)


DnsLabel = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]

# A container image with its tag or digest (the distribution reference grammar, pinned): a
# registry host[:port]/ if any, lower-case path components, then :tag and/or @sha256:digest.
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = (rf"^(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*(?::[0-9]{{1,5}})?/)?{_PATH}(?:/{_PATH})*"
                   r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}(?:@sha256:[a-f0-9]{64})?|@sha256:[a-f0-9]{64})$")


class KubernetesSettings(Strict):
    """How the kubernetes target installs the platform (platform.yaml `kubernetes:`)."""

    timeout_seconds: Annotated[int, Field(ge=10, le=3600)]  # helm --wait, each release
    history_max: Annotated[int, Field(ge=1, le=100)]       # revisions helm keeps for a rollback
    namespaces: dict[DnsLabel, list[str]]  # namespace: the components in it (and step services)
    datacenter: Name             # the Consul datacenter (mesh.datacenters) this cluster is
    services_image: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._/:-]*$")]  # repository of the services' image
    replicas: Annotated[int, Field(ge=1, le=10000)]  # pods of each Deployment of a bundled service

    def namespace(self, component: str) -> str:
        for namespace, members in self.namespaces.items():
            if component in members:
                return namespace
        raise KeyError(component)


class KeycloakNames(Strict):
    client: Name
    client_role: Name
    realm_role: Name
    scope: Name
    order_api_audience: Name
    vault_audience: Name
    stock_api_audience: Name
    service_role: Name
    service_scope: Name
    signing_key: Name


class ExchangeNames(Strict):
    orders: Name
    digital: Name
    dead_letter: Name


class QueueNames(Strict):
    priority: Name
    regular: Name
    digital: Name
    validation: Name
    dead_letter: Name


class TopicNames(Strict):
    orders: Name


class MongoNames(Strict):
    replica_set: Name
    database: Name
    orders: Name
    digital_orders: Name


class PostgresNames(Strict):
    database: Name


class VaultNames(Strict):
    kv_mount: Name
    reader_policy: Name
    jwt_path: Name
    clients_path: Name
    signing_key_path: Name


class Names(Strict):
    realm: Name
    keycloak: KeycloakNames
    exchanges: ExchangeNames
    queues: QueueNames
    topics: TopicNames
    mongodb: MongoNames
    postgres: PostgresNames
    vault: VaultNames


Duration = Annotated[str, Field(pattern=r"^[0-9]+[smh]$")]
Credential = Literal["rabbitmq", "postgres", "redis", "mongodb"]
# Secrets a service shares with systems opsctl does not run (generated into its Vault path):
# spark_auth_secret, the spark.authenticate secret of the Spark cluster the job runs on.
SharedSecret = Literal["spark_auth_secret"]


class VaultSettings(Strict):
    key_shares: Annotated[int, Field(ge=1, le=10)]
    key_threshold: Annotated[int, Field(ge=1, le=10)]
    auto_init: bool = True
    token_ttl: Duration
    token_max_ttl: Duration
    # opsctl's own admin token: periodic, renewed by every opsctl run for this long again.
    admin_token_period: Duration = "720h"

    @model_validator(mode="after")
    def _threshold(self) -> "VaultSettings":
        if self.key_threshold > self.key_shares:
            raise ValueError(f"key_threshold ({self.key_threshold}) is more than key_shares "
                             f"({self.key_shares})")
        return self


class RabbitMQSettings(Strict):
    max_priority: Annotated[int, Field(ge=1, le=255)]
    delivery_attempts: Annotated[int, Field(ge=1, le=100)]


Price = Annotated[float, Field(gt=0, le=100000)]


class Catalogue(Strict):
    initial_stock: Annotated[int, Field(ge=0)]
    products: dict[Name, dict[Annotated[str, Field(min_length=1, max_length=100)], Price]]


class ScreeningSettings(Strict):
    epochs: Annotated[int, Field(ge=1, le=10000)]
    seed: int
    target_fpr: Annotated[float, Field(gt=0, lt=1)]
    trigger_seconds: Annotated[float, Field(gt=0, le=3600)]


class BlueGreenSettings(Strict):
    """The gate of `opsctl bluegreen switch` and its watch after the switch (platform.yaml)."""

    analysis_seconds: Annotated[float, Field(ge=1, le=3600)]
    analysis_rate: Annotated[float, Field(gt=0, le=1000)]
    max_error_rate: Annotated[float, Field(ge=0, le=1)]
    max_p99_ms: Annotated[float, Field(gt=0)]
    min_requests: Annotated[int, Field(ge=1)]
    smoke_timeout: Annotated[float, Field(gt=0, le=600)]


class RedisAccess(Strict):
    keys: list[Annotated[str, Field(pattern=r"^[a-z_]+$")]]  # key prefixes: <prefix>:*
    commands: list[Annotated[str, Field(pattern=r"^[a-z]+$")]]  # besides ping


class Service(Strict):
    """A bundled service and its wiring: what it runs, what it reads and writes where. opsctl
    turns these into the service's environment, its users' permissions and the edge's routes;
    the service's code knows none of the other services' names."""

    image: str  # its container image: services/images/<image>/Dockerfile
    module: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_.]*$")]  # run as python -m <module>
    runtime: Literal["python", "spark"] = "python"  # spark: a streaming job (spark-submit on a cluster)
    credentials: list[Credential] = []
    shared_secrets: list[SharedSecret] = []
    port: Port | None = None  # HTTP services: where the API listens
    metrics_port: Port | None = None  # workers: where /metrics is served
    autostart: bool = True  # started by install and `services start` (else by its own command)
    routes: list[Annotated[str, Field(pattern=r"^(= )?/[A-Za-z0-9_./-]*$")]] = []  # nginx locations the edge sends it
    calls: list[Name] = []  # services it calls (their URL in its environment; they admit it)
    consumes: Literal["priority", "regular", "digital"] | None = None  # names.queues: the queue it reads
    publishes: Literal["orders"] | None = None  # names.exchanges: the exchange it writes to
    store: Literal["postgres", "mongodb"] | None = None  # where it keeps (or reads) orders
    collection: Literal["orders", "digital_orders"] | None = None  # names.mongodb: its collection
    # What it does in its store: MongoDB role order-writer or order-reader; catalogue: reads
    # and updates the stock table in PostgreSQL.
    role: Literal["writer", "reader", "catalogue"] = "writer"
    cache: RedisAccess | None = None  # its Redis ACL (none: ping only)
    streams: bool = False  # reads or writes names.topics.orders (Kafka admits it)

    @property
    def ports(self) -> dict[str, int]:
        return {"http": self.port} if self.port else {"metrics": self.metrics_port}

    @property
    def per_colour(self) -> bool:
        """An HTTP service runs in each colour, behind that colour's ingress; a worker (of a
        queue or a stream shared by both colours) runs once, on the live colour's build, so
        that no order is stored, published or flagged twice."""
        return self.port is not None

    @model_validator(mode="after")
    def _consistent(self) -> "Service":
        if (self.port is None) == (self.metrics_port is None):
            raise ValueError("give a service either port (HTTP) or metrics_port (worker)")
        if self.store and self.store not in self.credentials:
            raise ValueError(f"store {self.store} needs {self.store} in credentials")
        if (self.store == "mongodb") != (self.collection is not None):
            raise ValueError("a service whose store is mongodb names its collection, and only it")
        needs = {"reader": "mongodb", "catalogue": "postgres"}.get(self.role)
        if needs and self.store != needs:
            raise ValueError(f"role {self.role} needs store {needs}")
        if self.routes and not self.port:
            raise ValueError("only an HTTP service (port) has routes at the edge")
        return self


Colour = Literal["blue", "green"]
# The ports of one Consul agent; each datacenter's are components.consul.ports <dc>_<port>.
CONSUL_PORTS = ("http", "grpc", "grpc_tls", "dns", "server", "serf_lan")


MESH_BLOCK = 100  # ports of one colour's mesh (gateways, ingress listeners, sidecars)


class Mesh(Strict):
    """The two colours of the platform, each a Consul datacenter with its own copy of the
    HTTP services (the stateful servers and the workers are shared on the local target)."""

    datacenters: dict[Colour, Name]
    port_offset: dict[Colour, Annotated[int, Field(ge=0, le=10000)]]  # added to services.*.port
    ports_from: dict[Colour, Port]  # the first of the colour's MESH_BLOCK mesh ports

    @model_validator(mode="after")
    def _two(self) -> "Mesh":
        for field in ("datacenters", "port_offset", "ports_from"):
            if set(getattr(self, field)) != {"blue", "green"}:
                raise ValueError(f"mesh.{field} names a value for each of blue and green")
        if len(set(self.datacenters.values())) != 2:
            raise ValueError("mesh.datacenters: blue and green need datacenters of their own")
        if len(set(self.port_offset.values())) != 2:
            raise ValueError("mesh.port_offset: blue and green need different offsets")
        low, high = sorted(self.ports_from.values())
        if high - low < MESH_BLOCK or high + MESH_BLOCK > 65536:
            raise ValueError(f"mesh.ports_from: each colour needs {MESH_BLOCK} ports of its own")
        return self


class Spec(Strict):
    apiVersion: Literal["opsctl/v1"]
    platform: Platform
    components: dict[str, Component]
    names: Names
    vault: VaultSettings
    rabbitmq: RabbitMQSettings
    services: dict[Name, Service]
    catalogue: Catalogue
    screening: ScreeningSettings
    mesh: Mesh
    bluegreen: BlueGreenSettings
    kubernetes: KubernetesSettings

    @model_validator(mode="after")
    def _consistent(self) -> "Spec":
        from opsctl.registry import COMPONENTS

        unknown = sorted(set(self.components) - set(COMPONENTS))
        if unknown:
            raise ValueError(
                f"unknown component(s) {', '.join(unknown)}; known: {', '.join(COMPONENTS)}"
            )
        missing = [c for c in COMPONENTS if c not in self.components]
        if missing:
            raise ValueError(f"component(s) missing: {', '.join(missing)}")
        placed = [c for members in self.kubernetes.namespaces.values() for c in members]
        homeless = [c for c in [*COMPONENTS, "services"] if c not in placed]
        if homeless or len(placed) != len(set(placed)) or set(placed) - {*COMPONENTS, "services"}:
            raise ValueError("kubernetes.namespaces must name every component and the step services "
                             f"once (not placed: {', '.join(homeless) or 'none'})")
        if self.kubernetes.datacenter not in self.mesh.datacenters.values():
            raise ValueError(f"kubernetes.datacenter {self.kubernetes.datacenter!r} is not one of "
                             f"mesh.datacenters ({', '.join(self.mesh.datacenters.values())})")
        steps: dict[int, str] = {}
        ports: dict[int, str] = {}
        for name, comp in self.components.items():
            if comp.step in steps:
                raise ValueError(f"{name} and {steps[comp.step]} both use step {comp.step}")
            steps[comp.step] = name
            if "local" not in comp.targets:
                continue
            for port_name, port in comp.ports.items():
                if port in ports:
                    raise ValueError(
                        f"port {port} is used twice: {ports[port]} and {name}.{port_name}"
                    )
                ports[port] = f"{name}.{port_name}"
        for name, service in self.services.items():
            unknown = [c for c in service.calls if c not in self.services or not self.services[c].port]
            if unknown:
                raise ValueError(f"services.{name}.calls: {', '.join(unknown)} is not an HTTP service")
        consul = self.components["consul"].ports
        missing = [f"{dc}_{port}" for dc in self.mesh.datacenters.values() for port in CONSUL_PORTS
                   if f"{dc}_{port}" not in consul]
        if missing:
            raise ValueError(f"components.consul.ports needs {', '.join(missing)} "
                             f"(each datacenter's agent: <datacenter>_<port>)")
        taken = [(s.port or s.metrics_port, f"services.{name}") for name, s in self.services.items()
                 if not s.per_colour]
        for colour in self.mesh.datacenters:
            taken += [(self.service_port(name, colour), f"services.{name} ({colour})")
                      for name, s in self.services.items() if s.per_colour]
            taken += [(port, f"mesh {colour} {what}") for what, port in self.mesh_ports(colour).items()]
        for port, what in taken:
            if port in ports:
                raise ValueError(f"port {port} is used twice: {ports[port]} and {what}")
            ports[port] = what
        if len([s for s in self.services.values() if s.runtime == "spark"]) != 1:
            raise ValueError("exactly one service is the streaming job (runtime: spark)")
        return self

    def service_port(self, name: str, colour: str | None = None) -> int:
        """Where colour's copy of HTTP service `name` listens: its port plus the colour's
        offset; a worker (one copy) on its metrics port."""
        service = self.services[name]
        if not service.per_colour:
            return service.metrics_port
        return service.port + self.mesh.port_offset[colour or "blue"]

    def mesh_ports(self, colour: str) -> dict[str, int]:
        """The colour's mesh ports, laid out in its block from mesh.ports_from: the mesh
        gateway, the ingress gateway (a listener per service the edge routes to), and each
        HTTP service's sidecar (its public listener, admin, an upstream per service it calls)."""
        base = self.mesh.ports_from[colour]
        ports = {"mesh-gateway": base, "mesh-gateway/admin": base + 1, "ingress/admin": base + 2,
                 "ingress": base + 3}  # the ingress's own port: its readiness, Consul's check
        routed = [name for name, s in self.services.items() if s.routes]
        meshed = [name for name, s in self.services.items() if s.per_colour]
        if len(routed) > 10 or len(meshed) > 8 or any(len(self.services[n].calls) > 8 for n in meshed):
            raise ValueError("the mesh's port block holds 10 routed services, 8 HTTP services and "
                             "8 calls for each")
        for i, name in enumerate(routed):
            ports[f"ingress/{name}"] = base + 10 + i
        for i, name in enumerate(meshed):
            at = base + 20 + 10 * i
            ports[f"{name}/sidecar"], ports[f"{name}/admin"] = at, at + 1
            for j, callee in enumerate(self.services[name].calls):
                ports[f"{name}/upstream/{callee}"] = at + 2 + j
        return ports

    @property
    def stream_job(self) -> str:
        """The service that runs as the Spark streaming job."""
        return next(name for name, s in self.services.items() if s.runtime == "spark")

    def ordered(self) -> list[tuple[str, Component]]:
        """Components in install order."""
        return sorted(self.components.items(), key=lambda item: item[1].step)


def _loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def deep_merge(base: Any, override: Any) -> Any:
    """Override wins; mappings merge key by key, everything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return override


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}", "check the path and its permissions")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UsageError(f"{path}{where}: invalid YAML: {problem}", "fix the syntax and run again")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _has_path(data: Any, path: tuple) -> bool:
    for key in path:
        if isinstance(data, dict) and key in data:
            data = data[key]
        else:
            return False
    return True


def _describe(err: dict) -> str:
    value = err.get("input")
    got = "" if isinstance(value, (dict, list)) or value is None else f", got {value!r}"
    if err["type"] == "extra_forbidden":
        return "unknown field (check the spelling against platform.yaml)"
    if err["type"] == "missing":
        return "required field is missing"
    return f"{err['msg'].removeprefix('Value error, ')}{got}"


def override_path(explicit: str | None = None) -> Path | None:
    """The user's override file: --config, $OPSCTL_CONFIG, or ./opsctl.yaml if present."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("OPSCTL_CONFIG"):
        return Path(env)
    local = Path.cwd() / OVERRIDE_NAME
    return local if local.exists() else None


def load(config: str | None = None) -> Spec:
    base = _read_yaml(DEFAULT_SPEC)
    path = override_path(config)
    override = _read_yaml(path) if path else {}
    try:
        return Spec.model_validate(deep_merge(base, override))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(err["loc"])
            source = path if path and _has_path(override, loc) else DEFAULT_SPEC
            field = ".".join(str(p) for p in loc) or "(top level)"
            lines.append(f"{source}: {field}: {_describe(err)}")
        raise UsageError(
            "invalid platform spec:\n  " + "\n  ".join(lines),
            f"fix {path or OVERRIDE_NAME} (fields and defaults are in {DEFAULT_SPEC})",
        )
