"""Step 2 on the kubernetes target: LoadBalancer addresses for a kind cluster. MetalLB's
own chart (platform.yaml components.metallb.chart), then its address pool (the project's
address-pool chart): a range at the top of the cluster's docker network, computed from
`docker network inspect`, never typed. A cluster that kind did not make gets its load
balancers from its provider: there the step is skipped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from functools import cached_property

from opsctl.components.addons import Addon
from opsctl.components.base import Component, Outcome, Release, Server
from opsctl.errors import OpsError
from opsctl.host import require_binary
from opsctl.spec import Component as ComponentSpec

NOT_KIND = "not a kind cluster: its LoadBalancer addresses come from its provider"
POOL_SIZE = 51  # addresses, ending 5 below the network's broadcast address (.200-.250 of a /16)


def pool(subnets: list[str]) -> list[str]:
    """FIRST-LAST at the top of each IPv4 subnet of a docker network, where docker, which
    hands containers the lowest free addresses, does not reach."""
    ranges = []
    for subnet in subnets:
        network = ipaddress.ip_network(subnet, strict=False)
        if network.version != 4:
            continue
        if network.num_addresses < 256:
            raise OpsError(f"the kind cluster's docker network {subnet} is too small for a pool of load balancers",
                           "recreate the cluster on a docker network of /24 or larger")
        last = network.broadcast_address - 5
        ranges.append(f"{last - (POOL_SIZE - 1)}-{last}")
    if not ranges:
        raise OpsError(f"the kind cluster's docker network has no IPv4 subnet ({', '.join(subnets) or 'none'})",
                       "give the kind network an IPv4 subnet")
    return ranges


def docker_subnets(network: str) -> list[str] | None:
    """The subnets of docker network `network`; None if there is no such network."""
    docker = require_binary("docker", "install Docker (https://docs.docker.com/engine/install/)")
    found = subprocess.run([docker, "network", "inspect", network], capture_output=True, text=True, timeout=30)
    if found.returncode != 0:
        return None
    try:
        return [c["Subnet"] for n in json.loads(found.stdout) for c in (n.get("IPAM") or {}).get("Config") or []]
    except (ValueError, KeyError, TypeError) as e:
        raise OpsError(f"cannot read docker network {network}: {e}", "check `docker network inspect " + network + "`")


class AddressPool(Server):
    placed_with = "metallb"

    def __init__(self, ctx):
        super().__init__("metallb-pool", ctx)

    def _component_spec(self) -> ComponentSpec:
        metallb = self.ctx.spec.components["metallb"]
        return ComponentSpec(step=metallb.step, version=metallb.version, targets=["kubernetes"])

    def endpoint(self) -> str:
        return ""

    @cached_property
    def addresses(self) -> list[str]:
        network = os.environ.get("KIND_EXPERIMENTAL_DOCKER_NETWORK", "kind")  # the one kind uses
        subnets = docker_subnets(network)
        if subnets is None:
            if self.ctx.dry_run:
                return []  # the cluster (step 1) makes the network
            raise OpsError(f"there is no docker network {network} of the kind cluster",
                           "check `docker network ls`; run install again once the cluster is up")
        return pool(subnets)

    def release(self) -> Release:
        return Release("address-pool", {"addresses": self.addresses})


class Metallb(Component):
    """MetalLB's release, then its pool's: reconciled, stopped and reported together."""

    on_kubernetes = True  # more than its chart's release there

    @cached_property
    def parts(self) -> list[Server]:
        return [Addon(self.name, self.ctx), AddressPool(self.ctx)]

    def servers(self) -> list[Server]:
        return self.parts

    def check_installed(self) -> None:
        self.ctx.runtime.prepare(self.parts[0])  # its chart

    def _on_kind(self) -> bool:
        return self.ctx.runtime.is_kind()

    def reconcile(self) -> Outcome:
        if not self._on_kind():
            return Outcome("skipped", NOT_KIND)
        outcomes = [part.reconcile() for part in self.parts]  # the pool needs MetalLB's CRDs
        moved = [o for o in outcomes if o.state != "unchanged"]
        if not moved:
            return Outcome("unchanged", f"address pool {', '.join(self.parts[1].addresses)}")
        return Outcome(moved[0].state, "; ".join(o.detail for o in moved))

    def health(self):
        if not self._on_kind():
            return self._health("n/a", detail=NOT_KIND)
        reports = [part.health() for part in self.parts]
        return next((r for r in reports if not r.ok), reports[0])

    def stop(self) -> bool:
        return self._on_kind() and super().stop()

    def purge(self) -> None:
        if self._on_kind():
            super().purge()
