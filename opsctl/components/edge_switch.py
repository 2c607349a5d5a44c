"""The blue/green switch behind the edge: an Envoy between nginx and the colours' ingress
gateways that sends each routed service to the live colour.

nginx never reloads to switch: a reload makes its old workers close their clients' idle
kept-alive connections, and a client that sends a request on one just then gets a reset (a
POST it cannot safely send again). Envoy instead reads its routes and clusters from files
it watches (xDS from the filesystem): a switch replaces the route file, new requests take
the new colour's cluster while those in flight finish on the old one, and no connection on
either side is closed. It keeps connections open to both colours' ingresses, so the first
request after a switch does not wait for a handshake.

nginx names the service of each request in SERVICE_HEADER (it routes by path, once), and
the switch answers /healthz itself with the colour it sends to (COLOUR_HEADER).
"""

from __future__ import annotations

import json
import time

from opsctl import httpclient
from opsctl.components.base import Server, fingerprint
from opsctl.context import Context
from opsctl.errors import OpsError
from opsctl.files import read_json, write_atomic
from opsctl.spec import Component as ComponentSpec

SERVICE_HEADER = "X-Opsctl-Service"
COLOUR_HEADER = "X-Colour"
ROUTES, CLUSTERS = "routes.json", "clusters.json"
APPLY_TIMEOUT = 10.0  # seconds for Envoy to take a new route or cluster file
# A request may take as long as nginx lets it (PROXY_TIMEOUT); nginx times out first.
ROUTE_TIMEOUT = "40s"
# Idle connections to an ingress are closed by the switch (it never sends on one the ingress
# is closing: Envoy's own idle timeout there is an hour).
UPSTREAM_IDLE = "60s"
# Safe for any method: the request never left (the ingress was not there, or it closed a
# kept connection before the request was written).
RETRY_ON = "connect-failure,reset-before-request"
PORTS = {"http": "switch", "admin": "switch_admin"}  # its ports, as components.nginx.ports names them
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _any(kind: str, **fields) -> dict:
    return {"@type": f"type.googleapis.com/envoy.config.{kind}", **fields}


class EdgeSwitch(Server):
    ready_timeout = 30.0

    def __init__(self, ctx: Context):
        super().__init__("edge-switch", ctx)

    def _component_spec(self) -> ComponentSpec:
        nginx = self.ctx.spec.components["nginx"]
        return ComponentSpec(step=nginx.step, version="envoy",
                             ports={key: nginx.ports[port] for key, port in PORTS.items()})

    def address(self, port: str = ""):
        return self.ctx.address("nginx", PORTS[port or "http"])

    def port_setting(self, key: str) -> str:
        return f"components:\n    nginx:\n      ports: {{{PORTS[key]}: <free port>}}"

    def check_installed(self) -> None:
        from opsctl.components.mesh import envoy_binary

        envoy_binary()

    # --- what it sends where ------------------------------------------------------------
    def routed(self) -> list[str]:
        """The bundled services with routes at the edge (their public paths)."""
        return [name for name, s in self.ctx.spec.services.items() if s.routes]

    @staticmethod
    def cluster(service: str, colour: str) -> str:
        return f"{service}-{colour}"

    def clusters(self) -> dict:
        """Each routed service of each colour: that colour's ingress listener for it."""
        resources = []
        for colour in self.ctx.spec.mesh.datacenters:
            for service in self.routed():
                at = self.ctx.address("mesh", f"ingress/{service}", colour)
                name = self.cluster(service, colour)
                resources.append(_any(
                    "cluster.v3.Cluster", name=name, type="STATIC", connect_timeout="2s",
                    load_assignment={"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                        "address": {"socket_address": {"address": at.host, "port_value": at.port}}}}]}]},
                    typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "common_http_protocol_options": {"idle_timeout": UPSTREAM_IDLE},
                        "explicit_http_config": {"http_protocol_options": {}}}}))
        return _discovery(resources)

    def routes(self, colour: str) -> dict:
        """Every routed service to `colour`'s cluster; /healthz answered here, with the colour."""
        routes = [{"match": {"path": "/healthz"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]
        routes += [{"match": {"prefix": "/", "headers": [{"name": SERVICE_HEADER.lower(),
                                                          "string_match": {"exact": service}}]},
                    "route": {"cluster": self.cluster(service, colour), "timeout": ROUTE_TIMEOUT,
                              "retry_policy": {"retry_on": RETRY_ON, "num_retries": 1}}}
                   for service in self.routed()]
        return _discovery([_any(
            "route.v3.RouteConfiguration", name="live", request_headers_to_remove=[SERVICE_HEADER.lower()],
            response_headers_to_add=[{"header": {"key": COLOUR_HEADER, "value": colour},
                                      "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
            virtual_hosts=[{"name": "edge", "domains": ["*"], "routes": routes}])])

    # --- the server -------------------------------------------------------------------------
    def config_files(self) -> dict[str, str]:
        source = lambda name: {"path_config_source": {"path": str(self.path(name))},  # noqa: E731
                               "resource_api_version": "V3"}
        listen, admin = self.address("http"), self.address("admin")
        manager = {"@type": HCM, "stat_prefix": "edge", "rds": {"route_config_name": "live",
                                                                 "config_source": source(ROUTES)},
                   "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                       "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                       "suppress_envoy_headers": True}}]}
        bootstrap = {
            "node": {"id": "edge-switch", "cluster": "opsctl-edge"},
            "admin": {"address": {"socket_address": {"address": admin.host, "port_value": admin.port}}},
            "dynamic_resources": {"cds_config": source(CLUSTERS)},
            "static_resources": {"listeners": [{
                "name": "edge", "address": {"socket_address": {"address": listen.host, "port_value": listen.port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": manager}]}]}]},
        }
        return {"envoy.json": json.dumps(bootstrap, indent=1)}

    def initialise(self) -> None:
        # Envoy reads both files at start; they exist before it does.
        from opsctl.components import live

        write_atomic(self.path(CLUSTERS), json.dumps(self.clusters(), indent=1))
        write_atomic(self.path(ROUTES), json.dumps(self.routes(live.colour(self.ctx)), indent=1))

    def argv(self) -> list[str]:
        from opsctl.components.mesh import envoy_binary

        return [envoy_binary(), "-c", str(self.path("envoy.json")), "--disable-hot-restart",
                "--log-level", "warn"]

    def endpoint(self) -> str:
        return str(self.address("http"))

    def probe(self) -> bool:
        try:
            return httpclient.request("GET", self.address("admin").url("/ready"), timeout=1)[2].strip() == "LIVE"
        except (httpclient.HTTPError, OSError):
            return False

    def converge(self) -> str | None:
        """The clusters as the spec says (a moved ingress), the routes to the live colour."""
        from opsctl.components import live

        changed = []
        if self._take(CLUSTERS, self.clusters()):
            changed.append("clusters updated")
        colour = live.colour(self.ctx)
        if self.send_to(colour):
            changed.append(f"sends to {colour}")
        return ", ".join(changed) or None

    def send_to(self, colour: str) -> bool:
        """Send every routed service to `colour`; once this returns, new requests go there.
        False if it did already."""
        return self._take(ROUTES, self.routes(colour))

    def _take(self, name: str, wanted: dict) -> bool:
        """Replace file `name` if it differs from `wanted` and wait until Envoy took it."""
        if read_json(self.path(name), default=None) == wanted:
            return False
        write_atomic(self.path(name), json.dumps(wanted, indent=1))
        stat = "cluster_manager.cds.version_text" if name == CLUSTERS else "http.edge.rds.live.version_text"
        deadline = time.monotonic() + APPLY_TIMEOUT
        while self._stat(stat) != wanted["version_info"]:
            if time.monotonic() > deadline:
                raise OpsError(f"the edge switch did not take its new {name} within {APPLY_TIMEOUT:g} s",
                               f"see its log: {self.ctx.runtime.logfile(self)}")
            time.sleep(0.02)
        return True

    def _stat(self, name: str) -> str | None:
        try:
            text = httpclient.request("GET", self.address("admin").url(f"/stats?filter=^{name}$"), timeout=2)[2]
        except (httpclient.HTTPError, OSError):
            return None
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return value.strip().strip('"')
        return None


def _discovery(resources: list[dict]) -> dict:
    """A DiscoveryResponse, versioned by its content (Envoy reports the version it took)."""
    return {"version_info": fingerprint(resources), "resources": resources}
