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


def config_step(ctx: Context):
    """Step consul-config, once both agents answer (a plan says what it would write anyway)."""
    consul = _consul(ctx)
    if not ctx.dry_run:
        _running(consul)
    return build("consul-config", ctx)


def _running(consul) -> None:
    for agent in consul.agents():
        if not agent.probe():
            raise UsageError(f"Consul {agent.datacenter} is not running at {agent.endpoint()}",
                             "start it: opsctl install --only consul")


def _services(agent) -> list[dict]:
    """The datacenter's services as its health checks see them (gateways and sidecars too)."""
    rows = []
    for check in sorted(agent.api("GET", "health/state/any") or [], key=lambda c: c["ServiceName"]):
        if not check["ServiceName"]:
            continue  # the node's own serf check
        rows.append({"datacenter": agent.datacenter, "service": check["ServiceName"],
                     "instance": check["ServiceID"], "health": check["Status"], "checks": check["Name"]})
    merged: dict[str, dict] = {}
    for row in rows:  # one row per instance, its worst check
        seen = merged.setdefault(row["instance"], {**row, "checks": []})
        seen["checks"].append(row["checks"])
        if row["health"] != "passing":
            seen["health"] = row["health"]
    return [{**r, "checks": "; ".join(r["checks"])} for r in merged.values()]


def status(ctx: Context) -> Result:
    """Each colour's datacenter (its agent, leader, version), its side of the peering, and
    the health of each service registered in it; exit 3 unless both run, the peering is
    ACTIVE on both sides and every check passes."""
    consul = _consul(ctx)
    rows, services = [], []
    for colour, datacenter in ctx.spec.mesh.datacenters.items():
        agent = consul.agent(colour)
        health = agent.health()
        row = {"colour": colour, "datacenter": datacenter, "health": health.health,
               "endpoint": health.endpoint, "version": health.version, "detail": health.detail,
               "restarts": health.restarts, "peering": "unknown", "peer": ""}
        if health.ok:
            other = next(dc for dc in ctx.spec.mesh.datacenters.values() if dc != datacenter)
            row["peer"], row["peering"] = other, agent.peering_with(other)
            services += _services(agent)
        rows.append(row)
    ok = all(r["health"] == "healthy" and r["peering"] == "ACTIVE" for r in rows)
    ok = ok and all(s["health"] == "passing" for s in services)
    return Result({"datacenters": rows, "services": services}, 0 if ok else UNHEALTHY)


def peer(ctx: Context) -> Result:
    """Peer the two datacenters unless they are (idempotent); then their status."""
    consul = _consul(ctx)
    _running(consul)
    done = consul.peer()
    result = status(ctx)
    result.data["changed"] = done or ""
    return result
