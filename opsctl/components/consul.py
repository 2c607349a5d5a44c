"""Consul (step 7): a server agent per datacenter of the mesh (spec `mesh.datacenters`: dc1
for blue, dc2 for green), the two datacenters peered.

Each agent is a real server (server mode, its own data folder, not -dev) with the service
mesh and peering on and ACLs enforced (default deny): opsctl works with the management
token it generated (in .opsctl/secrets.json, 0600), nobody else gets anything without a token.
Peering needs no mesh gateway for its control plane: blue generates a token
(/v1/peering/token), green establishes with it (/v1/peering/establish), and the peering
goes ACTIVE over the agents' gRPC TLS ports with certificates from Consul's own Connect CA.
The services' traffic to the peer goes through each datacenter's mesh gateway, and the edge
into a colour through its ingress gateway (opsctl.components.mesh): both run with the agents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from opsctl import artifacts, httpclient
from opsctl.components.base import Component, Health, Outcome, Server
from opsctl.context import Context
from opsctl.errors import OpsError
from opsctl.net import port_open
from opsctl.spec import CONSUL_PORTS, Component as ComponentSpec

PACKAGE = "github.com/hashicorp/consul"
PEERING_TIMEOUT = 30.0  # seconds for a new peering to go ACTIVE


def _build_dir(ctx: Context) -> Path:
    return ctx.cache_dir / f"consul-{ctx.spec.components['consul'].version}"


def binary(ctx: Context) -> Path:
    """Where the agent built from its Go module lives (check_installed builds it)."""
    return _build_dir(ctx) / "consul"


def management_token(ctx: Context) -> str:
    import uuid

    return ctx.secret("consul", "management_token", generate=lambda: str(uuid.uuid4()))


def chart_values(ctx: Context) -> dict:
    """The hashicorp/consul chart's values on the kubernetes target: this cluster's datacenter,
    as the services' CRs name it."""
    return {"global": {"datacenter": ctx.spec.kubernetes.datacenter}}


class ConsulAgent(Server):
    """The server agent of one datacenter, named consul-<datacenter>."""

    ready_timeout = 60.0

    def __init__(self, datacenter: str, ctx: Context):
        self.datacenter = datacenter
        super().__init__(f"consul-{datacenter}", ctx)

    def _component_spec(self) -> ComponentSpec:
        consul = self.ctx.spec.components["consul"]
        prefix = f"{self.datacenter}_"
        return consul.model_copy(update={"ports": {k[len(prefix):]: v for k, v in consul.ports.items()
                                                   if k.startswith(prefix)}})

    def port_setting(self, key: str) -> str:
        return f"components:\n    consul:\n      ports: {{{self.datacenter}_{key}: <free port>}}"

    def address(self, port: str = ""):
        return self.ctx.address("consul", f"{self.datacenter}_{port or 'http'}")

    def endpoint(self) -> str:
        return self.address("http").url()

    def check_installed(self) -> None:
        """Built from its Go module into the cache once (minutes of CPU; scripts/setup does it)."""
        if not self.ctx.dry_run:
            artifacts.go_binary("consul", self.spec.artifact or PACKAGE, _build_dir(self.ctx))

    def config_files(self) -> dict[str, str]:
        host = self.ctx.host
        ports = {key: self.port(key) for key in CONSUL_PORTS}
        config = {
            "datacenter": self.datacenter,
            "node_name": f"{self.datacenter}-server",
            "server": True,
            "bootstrap_expect": 1,
            "data_dir": str(self.path("data")),
            "bind_addr": host, "advertise_addr": host, "client_addr": host,
            "ports": {**ports, "https": -1, "serf_wan": -1},
            "connect": {"enabled": True},
            "peering": {"enabled": True},
            "ui_config": {"enabled": False},
            "disable_update_check": True,
            "enable_script_checks": False,
            "leave_on_terminate": False,
            "log_level": "INFO",
            "acl": {"enabled": True, "default_policy": "deny", "enable_token_persistence": False,
                    "tokens": {"initial_management": management_token(self.ctx),
                               "agent": management_token(self.ctx)}},
        }
        return {"agent.json": json.dumps(config, indent=2) + "\n"}

    def initialise(self) -> None:
        self.path("data").mkdir(mode=0o700, exist_ok=True)

    def argv(self) -> list[str]:
        return [str(binary(self.ctx)), "agent", f"-config-file={self.path('agent.json')}"]

    def api(self, method: str, path: str, body=None, timeout: float = 5.0):
        """A call to this agent's HTTP API with the management token."""
        return httpclient.request(method, f"{self.endpoint()}/v1/{path}", body=body, timeout=timeout,
                                  headers={"X-Consul-Token": management_token(self.ctx)})[2]

    def probe(self) -> bool:
        if not port_open(self.address("http")):
            return False
        try:  # a leader elected: the datacenter takes writes
            return bool(httpclient.get(f"{self.endpoint()}/v1/status/leader", timeout=1))
        except (httpclient.HTTPError, OSError):
            return False

    def version(self) -> str:
        return self.api("GET", "agent/self")["Config"]["Version"]

    def peering_with(self, datacenter: str) -> str:
        """This side's state of the peering with `datacenter` (each side names the peering
        after the other datacenter): ACTIVE, PENDING, TERMINATED, … or absent."""
        found = [p for p in self.api("GET", "peerings") or [] if p["Name"] == datacenter]
        return found[0]["State"] if found else "absent"


class Consul(Component):
    """Both datacenters' agents running, and the datacenters peered (blue accepts, green dials)."""

    def check_installed(self) -> None:
        self.agents()[0].check_installed()

    def agents(self) -> list[ConsulAgent]:
        return [ConsulAgent(dc, self.ctx) for dc in self.ctx.spec.mesh.datacenters.values()]

    def gateways(self) -> list[Server]:
        from opsctl.components.mesh import gateways

        return gateways(self.ctx)

    def servers(self) -> list[Server]:
        return [*self.agents(), *self.gateways()]

    def agent(self, colour: str) -> ConsulAgent:
        return ConsulAgent(self.ctx.spec.mesh.datacenters[colour], self.ctx)

    def reconcile(self) -> Outcome:
        outcomes = [(agent.datacenter, agent.reconcile()) for agent in self.agents()]
        failed = [f"{dc}: {o.detail}" for dc, o in outcomes if o.state == "failed"]
        if failed:
            return Outcome("failed", "; ".join(failed))
        changed = [f"{dc} {o.detail}" for dc, o in outcomes if o.state in ("changed", "planned")]
        peering = self.peer()
        if peering:
            changed.append(peering)
        changed += [f"{g.name} {o.detail}" for g in self.gateways() for o in [g.reconcile()]
                    if o.state in ("changed", "planned")]
        if not changed:
            return Outcome("unchanged", ", ".join(f"{a.datacenter} {a.endpoint()}" for a in self.agents()))
        return Outcome("planned" if self.ctx.dry_run else "changed", "; ".join(changed))

    # --- peering ---------------------------------------------------------------------
    def peering_state(self) -> dict[str, str]:
        """Each datacenter's view of its peering with the other: ACTIVE, PENDING, … or absent."""
        return {agent.datacenter: agent.peering_with(other.datacenter) for agent, other in self._pairs()}

    def _pairs(self) -> list[tuple[ConsulAgent, ConsulAgent]]:
        blue, green = self.agent("blue"), self.agent("green")
        return [(blue, green), (green, blue)]

    def peer(self) -> str | None:
        """Peer the datacenters unless they already are (ACTIVE on both sides); say what
        was done. Blue accepts (generates the token), green dials (establishes)."""
        acceptor, dialer = self.agent("blue"), self.agent("green")
        try:
            states = self.peering_state()
        except (httpclient.HTTPError, OSError):
            if not self.ctx.dry_run:
                raise
            states = {}  # a plan before the agents run: they will be peered
        if states and set(states.values()) == {"ACTIVE"}:
            return None
        if self.ctx.dry_run:
            return f"peer {acceptor.datacenter} and {dialer.datacenter}"
        # A half-made or failed peering (one side deleted, a token never used) is made again.
        for agent, other in self._pairs():
            if states[agent.datacenter] != "absent":
                agent.api("DELETE", f"peering/{other.datacenter}")
        self._wait_deleted()
        token = acceptor.api("POST", "peering/token",
                             {"PeerName": dialer.datacenter})["PeeringToken"]
        dialer.api("POST", "peering/establish",
                   {"PeerName": acceptor.datacenter, "PeeringToken": token}, timeout=15)
        deadline = time.monotonic() + PEERING_TIMEOUT
        while True:
            states = self.peering_state()
            if set(states.values()) == {"ACTIVE"}:
                return f"peered {acceptor.datacenter} and {dialer.datacenter}"
            if time.monotonic() > deadline:
                raise OpsError(f"the peering of {acceptor.datacenter} and {dialer.datacenter} did not "
                               f"become active within {PEERING_TIMEOUT:g} s ({states})",
                               f"see the agents' logs: {self.ctx.runtime.logfile(acceptor)} and "
                               f"{self.ctx.runtime.logfile(dialer)}")
            time.sleep(0.25)

    def _wait_deleted(self) -> None:
        deadline = time.monotonic() + PEERING_TIMEOUT
        while any(s != "absent" for s in self.peering_state().values()):
            if time.monotonic() > deadline:
                raise OpsError("an old peering of the datacenters is still being deleted",
                               "run the command again in a minute")
            time.sleep(0.25)

    # --- health, stop, purge ---------------------------------------------------------
    def health(self) -> Health:
        healths = [server.health() for server in self.servers()]
        bad = [h for h in healths if not h.ok]
        endpoint = ", ".join(a.endpoint() for a in self.agents())
        restarts = sum(h.restarts for h in healths)
        last_error = "; ".join(h.last_error for h in healths if h.last_error)
        if bad:
            worst = "unhealthy" if any(h.health == "unhealthy" for h in bad) else bad[0].health
            return self._health(worst, endpoint=endpoint, restarts=restarts, last_error=last_error,
                                detail="; ".join(f"{h.component}: {h.detail}" for h in bad))
        try:
            states = self.peering_state()
        except (httpclient.HTTPError, OSError) as e:
            return self._health("unhealthy", endpoint=endpoint, detail=f"peering: {e}")
        detail = "peering " + ", ".join(f"{dc} {state}" for dc, state in states.items())
        return self._health("healthy" if set(states.values()) == {"ACTIVE"} else "unhealthy",
                            endpoint=endpoint, version=healths[0].version, restarts=restarts,
                            last_error=last_error, detail=detail)
