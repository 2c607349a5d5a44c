"""The Consul mesh: each colour's datacenter and the peering between them (opsctl consul)."""

from __future__ import annotations

from opsctl.app import Result
from opsctl.components import build
from opsctl.context import Context
from opsctl.errors import UNHEALTHY, UsageError


def _consul(ctx: Context):
    consul = build("consul", ctx)
    if not hasattr(consul, "agents"):
        raise UsageError(f"Consul does not run on the {ctx.target} target here: {consul.reason}")
    return consul


def status(ctx: Context) -> Result:
    """Each colour's datacenter (its agent, leader, version) and its side of the peering;
    exit 3 unless both run and the peering is ACTIVE on both sides."""
    consul = _consul(ctx)
    rows = []
    for colour, datacenter in ctx.spec.mesh.datacenters.items():
        agent = consul.agent(colour)
        health = agent.health()
        row = {"colour": colour, "datacenter": datacenter, "health": health.health,
               "endpoint": health.endpoint, "version": health.version, "detail": health.detail,
               "restarts": health.restarts, "peering": "unknown", "peer": ""}
        if health.ok:
            other = next(dc for dc in ctx.spec.mesh.datacenters.values() if dc != datacenter)
            row["peer"], row["peering"] = other, agent.peering_with(other)
        rows.append(row)
    ok = all(r["health"] == "healthy" and r["peering"] == "ACTIVE" for r in rows)
    return Result({"datacenters": rows}, 0 if ok else UNHEALTHY)


def peer(ctx: Context) -> Result:
    """Peer the two datacenters unless they are (idempotent); then their status."""
    consul = _consul(ctx)
    for agent in consul.agents():
        if not agent.probe():
            raise UsageError(f"Consul {agent.datacenter} is not running at {agent.endpoint()}",
                             "start it: opsctl install --only consul")
    done = consul.peer()
    result = status(ctx)
    result.data["changed"] = done or ""
    return result
