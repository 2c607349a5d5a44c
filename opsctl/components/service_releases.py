"""The bundled services on the kubernetes target (step services): a release of the project's
order-service chart per service, and the cluster's own Consul entries (mesh-config chart).

An HTTP service runs a blue and a green Deployment behind one Service whose selector names
the live colour (opsctl bluegreen switch moves it); a worker runs once, on the live colour's
build, as on the local target. The mesh is the same platform.yaml entries as the local one
(mesh.config_entries), as consul-k8s CRs: this cluster is one datacenter
(kubernetes.datacenter), and its peer is the other one's cluster.
"""

from __future__ import annotations

from opsctl.components import live
from opsctl.components.base import Release, Server
from opsctl.components.mesh import config_entries, peer_of, per_colour
from opsctl.components.nginx import INGRESS_CLASS, ingress_paths
from opsctl.context import Context
from opsctl.spec import Component as ComponentSpec

CRD_VERSION = "consul.hashicorp.com/v1alpha1"
STATE_PATH = "/var/lib/order-service"  # its emptyDir


def _camel(key: str) -> str:
    """A config entry's field as consul-k8s names it: Protocol -> protocol, HTTP -> http."""
    return key.lower() if key.isupper() else key[:1].lower() + key[1:]


def _fields(value):
    if isinstance(value, dict):
        return {_camel(k): _fields(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fields(v) for v in value]
    return value


def _kind(entry_kind: str) -> str:
    """service-defaults -> ServiceDefaults."""
    return "".join(part.title() for part in entry_kind.split("-"))


# The CRs of one service's release; the others are the cluster's (mesh-config).
PER_SERVICE = {_kind(k) for k in ("service-defaults", "service-resolver", "service-router", "service-intentions")}


def _cr(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": CRD_VERSION, "kind": kind,
            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "opsctl"}}, "spec": spec}


def custom_resource(entry: dict) -> dict:
    """A Consul config entry (its API's form) as the consul-k8s CR of the same meaning."""
    spec = _fields({k: v for k, v in entry.items() if k not in ("Kind", "Name", "Meta")})
    name = entry["Name"]
    if entry["Kind"] == "service-intentions":  # the CR names its destination in its spec
        spec = {"destination": {"name": name}, **spec}
        name = "all-services" if name == "*" else name
    return _cr(_kind(entry["Kind"]), name, spec)


def cluster_colour(ctx: Context) -> str:
    return next(c for c, dc in ctx.spec.mesh.datacenters.items() if dc == ctx.spec.kubernetes.datacenter)


def entries(ctx: Context) -> list[dict]:
    """Every CR of this cluster's datacenter, and its side of the peering: the first
    datacenter of mesh.datacenters accepts, the other dials with the token it was given."""
    colour = cluster_colour(ctx)
    found = [custom_resource(e) for e in config_entries(ctx, colour)]
    peer = peer_of(ctx, colour)
    side = "PeeringAcceptor" if colour == next(iter(ctx.spec.mesh.datacenters)) else "PeeringDialer"
    found.append(_cr(side, peer, {"peer": {"secret": {"name": f"peering-token-{peer}", "key": "data",
                                                       "backend": "kubernetes"}}}))
    return found


def _own(resource: dict, service: str) -> bool:
    """Whether a CR belongs to `service`'s release (else to the cluster's, mesh-config)."""
    return resource["kind"] in PER_SERVICE and resource["metadata"]["name"] == service


def image(ctx: Context) -> str:
    """The services' image of this version of opsctl: what a colour runs until `bluegreen
    deploy --image` gives it another."""
    import importlib.metadata

    return f"{ctx.spec.kubernetes.services_image}:{importlib.metadata.version('order-services')}"


def deployed_images(ctx: Context) -> dict[str, dict]:
    """colour -> {"image", "since"}: what `bluegreen deploy` put on each colour, kept on the
    cluster (ctx.runtime.keep_record)."""
    kept = ctx.runtime.read_record(ctx.spec, "images") or {}
    return {c: d for c, d in kept.items()
            if c in ctx.spec.mesh.datacenters and isinstance(d, dict) and isinstance(d.get("image"), str)}


class ServiceRelease(Server):
    """One bundled service as a release of the order-service chart; with `colour`, that
    colour's Deployment of it (its health, for bluegreen)."""

    placed_with = "services"  # in the namespace of step services

    def __init__(self, name: str, ctx: Context, live_colour: str, crs: list[dict], images: dict[str, dict],
                 colour: str | None = None):
        self.service, self.live_colour, self.crs, self.images = ctx.spec.services[name], live_colour, crs, images
        self.colour = colour
        super().__init__(name, ctx)

    def image(self, colour: str) -> str:
        return (self.images.get(colour) or {}).get("image") or image(self.ctx)

    def _component_spec(self) -> ComponentSpec:
        from opsctl.registry import step_number

        return ComponentSpec(step=step_number(self.ctx.spec, "services"), version="bundled",
                             ports=self.service.ports)

    def endpoint(self) -> str:
        return str(self.ctx.address(self.name, colour=self.colour))

    def release(self) -> Release:
        from opsctl.components.services import environment

        ctx, spec, name, now = self.ctx, self.ctx.spec, self.name, self.live_colour
        env = environment(ctx, name, "", now)
        for handed_otherwise in ("OIDC_CLIENT_SECRET", "COLOUR"):  # its Secret; the chart, per colour
            env.pop(handed_otherwise, None)
        env.update({"HTTP_HOST" if self.service.port else "METRICS_HOST": "0.0.0.0", "STATE_DIR": STATE_PATH})
        colours = list(spec.mesh.datacenters) if self.service.per_colour else [now]
        namespaces = [spec.kubernetes.namespace("prometheus-grafana")]
        if self.service.routes:
            namespaces += [spec.kubernetes.namespace("nginx"), spec.kubernetes.namespace("consul")]
        return Release("order-service", {
            "command": ["python", "-m", self.service.module],
            "colours": {c: {"image": self.image(c), "replicas": spec.kubernetes.replicas} for c in colours},
            "live": now, "port": self.service.port or 0, "metricsPort": self.service.metrics_port or 0,
            "env": env, "secretEnv": {"OIDC_CLIENT_SECRET": "client-secret"}, "statePath": STATE_PATH,
            "upstreams": ",".join(f"{callee}:{spec.services[callee].port}" for callee in self.service.calls),
            "routes": ingress_paths(self.service.routes), "ingressClass": INGRESS_CLASS,
            "allowFrom": sorted(other for other, s in spec.services.items() if name in s.calls),
            "allowNamespaces": sorted(set(namespaces)),
            "consulEntries": [r for r in self.crs if _own(r, name)]},
            secrets=["client-secret"])


class MeshRelease(Server):
    """The cluster's Consul entries that belong to no one service."""

    placed_with = "consul"

    def __init__(self, ctx: Context, crs: list[dict]):
        self.crs = crs
        super().__init__("mesh-config", ctx)

    def _component_spec(self) -> ComponentSpec:
        from opsctl.registry import step_number

        return ComponentSpec(step=step_number(self.ctx.spec, "services"), version="consul-k8s CRs")

    def endpoint(self) -> str:
        return ""

    def release(self) -> Release:
        return Release("mesh-config", {"consulEntries": [
            r for r in self.crs if not any(_own(r, s) for s in self.ctx.spec.services)]})


def releases(ctx: Context, colour: str | None = None) -> list[Server]:
    """What step services installs on the kubernetes target: the mesh's entries, then each
    service that install starts (the streaming job is `jobs stream`'s); with `colour`, each
    HTTP service's Deployment of that colour. The live colour, the CRs and the images are
    read once for all of them (each release() is asked for again by status)."""
    now, crs, images = live.colour(ctx), entries(ctx), deployed_images(ctx)
    if colour:
        return [ServiceRelease(name, ctx, now, crs, images, colour) for name in per_colour(ctx)]
    return [MeshRelease(ctx, crs)] + [ServiceRelease(name, ctx, now, crs, images) for name, s in ctx.spec.services.items()
                                      if s.autostart and s.runtime == "python"]
