"""nginx (Debian package): the edge, with the blue/green switch behind it (edge_switch.py).

Clients reach the order API and the stock service only through the edge (`edge_url`): it
cuts off slow and oversized clients before they reach a service, routes each path to its
service, keeps a pool of open connections to the switch, never sends a POST twice, and
answers in JSON when a service is down. The switch sends each service to the live colour's
ingress; a switch of colour never touches nginx.
"""

from __future__ import annotations

import json
import signal
from functools import cached_property

from opsctl import httpclient
from opsctl.components.base import Outcome, Server
from opsctl.components.edge_switch import SERVICE_HEADER, EdgeSwitch
from opsctl.host import require_binary

# Limits of the edge. A slow client gets HEADER_TIMEOUT for its whole header, and at most
# BODY_TIMEOUT between two reads of its body; nginx reads the whole body before it passes
# the request on, so a slow body never holds a service.
HEADER_TIMEOUT = 5       # seconds
BODY_TIMEOUT = 5         # seconds
SEND_TIMEOUT = 10        # seconds between two writes to a client that reads slowly
MAX_BODY_KIB = 64        # the order API's own limit (order_services.bodies.MAX_BODY_BYTES)
HEADER_BUFFER = "4k"     # a request with a token fits; longer header lines get...
LARGE_HEADER_BUFFERS = "4 8k"  # ...these; a line over 8 KiB is refused (431)
KEEPALIVE_TIMEOUT = 10   # seconds an idle client connection stays open
KEEPALIVE_REQUESTS = 1000  # requests on one client connection, then it is closed
KEEPALIVE_TIME = "10m"   # the longest a client connection lives
# Idle connections to the switch are closed by the edge (the switch keeps them an hour),
# so that the edge never sends a request on a connection being closed.
UPSTREAM_KEEPALIVE = 64
UPSTREAM_IDLE = 2        # seconds
PROXY_CONNECT_TIMEOUT = 2
PROXY_TIMEOUT = 30       # seconds between two reads/writes of a service (POST /create of 1000)
WORKER_CONNECTIONS = 2048

# What the edge answers itself, as JSON like the services' errors: status -> detail.
RETRY = ("retry in a moment; a POST with the same Idempotency-Key is never "
         "placed twice")
ERRORS = {
    400: "bad request",
    408: "the request was not sent in time",
    413: f"request body larger than {MAX_BODY_KIB} KiB",
    414: "request line too long",
    431: "request header too large",
    500: "internal error",
    502: f"the service behind the edge is not answering: {RETRY}",
    503: f"the service behind the edge is unavailable: {RETRY}",
    504: f"the service behind the edge did not answer in time: {RETRY}",
}


# What the edge answers on a route in its own JSON, whoever said it first: itself (a slow or
# oversized body) or what is behind it. The mesh answers 502/503/504 in plain text ("no healthy
# upstream") when no instance of a service can take a request; a service's own 503 is answered
# the same way (its reason is in its log, under the request id). A service's 4xx pass as they are.
ROUTE_ERRORS = (408, 413, 500, 502, 503, 504)
ROUTE_ERROR_PAGES = " ".join(f"error_page {s} @{s};" for s in ROUTE_ERRORS)


def edge_url(ctx) -> str:
    """The URL clients use for the order API and the stock service: the edge."""
    return ctx.address("nginx", "http").url()


INGRESS_CLASS = "opsctl-edge"  # kubernetes: the IngressClass of the edge (ingress-nginx's chart)


def chart_values(ctx) -> dict:
    """ingress-nginx's chart values on the kubernetes target: the same limits as the local
    edge (its ConfigMap's keys), and the edge's own IngressClass, which the services'
    Ingresses name. opsctl writes the only Ingresses, so the chart's admission webhook (and
    the Jobs that make its certificate) are left out."""
    config = {
        "client-header-timeout": HEADER_TIMEOUT, "client-body-timeout": BODY_TIMEOUT,
        "client-header-buffer-size": HEADER_BUFFER, "large-client-header-buffers": LARGE_HEADER_BUFFERS,
        "proxy-body-size": f"{MAX_BODY_KIB}k", "client-body-buffer-size": f"{MAX_BODY_KIB}k",
        "keep-alive": KEEPALIVE_TIMEOUT, "keep-alive-requests": KEEPALIVE_REQUESTS,
        "upstream-keepalive-connections": UPSTREAM_KEEPALIVE, "upstream-keepalive-timeout": UPSTREAM_IDLE,
        "proxy-connect-timeout": PROXY_CONNECT_TIMEOUT, "proxy-send-timeout": PROXY_TIMEOUT,
        "proxy-read-timeout": PROXY_TIMEOUT, "proxy-next-upstream": "off", "max-worker-connections": WORKER_CONNECTIONS,
    }
    # Its Service is `nginx` on the edge's port, where the target's address() finds the edge.
    return {"fullnameOverride": "nginx", "controller": {
        "name": "", "service": {"ports": {"http": ctx.spec.components["nginx"].ports["http"]}},
        "ingressClass": INGRESS_CLASS,
        "ingressClassResource": {"name": INGRESS_CLASS, "controllerValue": f"k8s.io/{INGRESS_CLASS}"},
        "config": {key: str(value) for key, value in config.items()},
        "admissionWebhooks": {"enabled": False}, "metrics": {"enabled": True}}}


def ingress_paths(routes: list[str]) -> list[dict]:
    """nginx locations (`= /exact`, `/prefix/`) as an Ingress's paths."""
    return [{"path": route.removeprefix("=").strip(), "pathType": "Exact" if route.startswith("=") else "Prefix"}
            for route in routes]


def _json_return(status: int, detail: str) -> str:
    body = json.dumps({"detail": detail, "request_id": "${edge_request_id}"})
    return f"return {status} '{body}';"


class Nginx(Server):
    """The edge (this server) and the switch behind it, reconciled, stopped and reported
    together as step nginx."""

    # A new configuration (a moved port, a new route) is a graceful reload: new workers take
    # new connections while the old ones finish the requests in hand.
    reload_signal = signal.SIGHUP

    def _component_spec(self):
        spec = self.ctx.spec.components[self.name]
        return spec.model_copy(update={"ports": {"http": spec.ports["http"]}})

    @cached_property
    def switch(self) -> EdgeSwitch:
        return EdgeSwitch(self.ctx)

    def check_installed(self) -> None:
        require_binary("nginx", "apt-get install -y nginx-light")

    def config_files(self) -> dict[str, str]:
        home, host = self.home, self.ctx.host
        temp = "\n".join(f"  {kind}_temp_path {home}/tmp/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # Each public path of a routed service (the rest, /metrics and such, stays internal)
        # goes to the switch, which sends its service to the live colour.
        routes = [f"    location {path} {{ set $edge_service {name}; proxy_pass http://switch; {ROUTE_ERROR_PAGES} }}"
                  for name in self.switch.routed() for path in self.ctx.spec.services[name].routes]
        # Every answer says its request id (the switch adds the colour it sent it to).
        headers = "add_header X-Request-ID $edge_request_id always;"
        errors = []
        for status, detail in ERRORS.items():
            extra = " add_header Retry-After 1 always;" if status >= 502 else ""
            errors.append(f"    location @{status} {{ {headers}{extra} {_json_return(status, detail)} }}")
        # Named locations: the request keeps its method (an error_page URI would make it GET).
        error_pages = "\n".join(f"    error_page {s} @{s};" for s in ERRORS if s != 431)
        nl = "\n"
        return {"nginx.conf": f"""worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/logs/error.log info;
events {{ worker_connections {WORKER_CONNECTIONS}; }}
http {{
  # A client's X-Request-ID when it is a plain token, else a new one: sent on to the
  # service, returned to the client, and in the access log.
  map $http_x_request_id $edge_request_id {{
    "~^[A-Za-z0-9._:-]{{1,128}}$" $http_x_request_id;
    default $request_id;
  }}
  log_format edge escape=json '{{"time": "$time_iso8601", "client": "$remote_addr", '
    '"request_id": "$edge_request_id", "method": "$request_method", "uri": "$request_uri", '
    '"status": $status, "bytes": $body_bytes_sent, "request_time": $request_time, '
    '"upstream": "$upstream_addr", "upstream_status": "$upstream_status", '
    '"upstream_time": "$upstream_response_time"}}';
  access_log {home}/logs/access.log edge buffer=64k flush=1s;
{temp}
  default_type application/json;

  # Slow and oversized clients.
  client_header_timeout {HEADER_TIMEOUT}s;
  client_body_timeout {BODY_TIMEOUT}s;
  send_timeout {SEND_TIMEOUT}s;
  client_header_buffer_size {HEADER_BUFFER};
  large_client_header_buffers {LARGE_HEADER_BUFFERS};
  client_max_body_size {MAX_BODY_KIB}k;
  # Bodies and answers stay in memory: the workers need not write under the state folder.
  client_body_buffer_size {MAX_BODY_KIB}k;
  proxy_max_temp_file_size 0;
  keepalive_timeout {KEEPALIVE_TIMEOUT}s;
  keepalive_requests {KEEPALIVE_REQUESTS};
  keepalive_time {KEEPALIVE_TIME};
  reset_timedout_connection on;

  # To the services: kept-alive HTTP/1.1 connections, the client's address and request id.
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host $host;
  proxy_set_header X-Forwarded-For $remote_addr;
  proxy_set_header X-Forwarded-Proto $scheme;
  proxy_set_header X-Request-ID $edge_request_id;
  proxy_set_header {SERVICE_HEADER} $edge_service;
  proxy_connect_timeout {PROXY_CONNECT_TIMEOUT}s;
  proxy_send_timeout {PROXY_TIMEOUT}s;
  proxy_read_timeout {PROXY_TIMEOUT}s;
  # A request that failed is never sent again (to this or another server): a POST may have
  # placed its order already; the client retries, with its Idempotency-Key.
  proxy_next_upstream off;
  proxy_intercept_errors on;  # on the routes, for ROUTE_ERRORS only

  upstream switch {{
    server {self.switch.address("http")};
    keepalive {UPSTREAM_KEEPALIVE};
    keepalive_timeout {UPSTREAM_IDLE}s;
  }}

  server {{
    listen {host}:{self.port('http')};
    {headers}
{error_pages}
    error_page 494 =431 @431;
    # Answered by the switch: the edge is healthy when both answer; X-Colour says where it sends.
    location = /healthz {{ set $edge_service healthz; proxy_pass http://switch; }}
{nl.join(routes)}
    location / {{ {_json_return(404, "not found")} }}
{nl.join(errors)}
  }}
}}
"""}

    # --- with the switch ----------------------------------------------------------------
    def reconcile(self) -> Outcome:
        switch = self.switch.reconcile()  # first: the edge's /healthz is answered by it
        edge = super().reconcile()
        if switch.state not in ("changed", "planned"):
            return edge
        state = edge.state if edge.state != "unchanged" else switch.state
        detail = f"switch {switch.detail}" + ("" if edge.state == "unchanged" else f"; {edge.detail}")
        return Outcome(state, detail)

    def health(self):
        edge, switch = super().health(), self.switch.health()
        if switch.ok or not edge.ok:
            return edge
        return self._health("unhealthy", endpoint=edge.endpoint, restarts=switch.restarts,
                            last_error=switch.last_error, detail=f"the switch: {switch.detail}")

    def stop(self) -> bool:
        return any([super().stop(), self.switch.stop()])

    def purge(self) -> None:
        super().purge()
        self.switch.purge()

    def initialise(self) -> None:
        self.path("tmp").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        return ["nginx", "-p", f"{self.home}/", "-e", str(self.path("logs", "error.log")),
                "-c", str(self.path("nginx.conf")), "-g", "daemon off;"]

    def _healthz(self) -> str:
        return self.address("http").url("/healthz")

    def probe(self) -> bool:
        return httpclient.answers(self._healthz(), timeout=1)

    def version(self) -> str:
        server = httpclient.request("GET", self._healthz(), timeout=1)[1].get("Server", "")
        return server.removeprefix("nginx/")
