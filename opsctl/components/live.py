"""Which colour is live: the one the edge sends clients to and whose build runs the workers.

Kept in Consul's KV of both datacenters (KV is not replicated across a peering), where it
survives opsctl and this working directory, and mirrored to .opsctl/live.json so that the
edge can be written before Consul runs. The newest record of the three wins; with none,
blue is live (a first install). On the kubernetes target the record is the cluster's (a
ConfigMap beside the services: ctx.runtime.read_record / keep_record).
"""

from __future__ import annotations

import json
import time

from opsctl import httpclient
from opsctl.context import Context
from opsctl.files import read_json, write_json_atomic

KEY = "opsctl/live"
HISTORY = 20  # switches kept in the record


def _mirror(ctx: Context):
    return ctx.state_dir / "live.json"


def _from_consul(ctx: Context) -> list[dict]:
    from opsctl.components.mesh import agent

    found = []
    for colour in ctx.spec.mesh.datacenters:
        try:
            value = agent(ctx, colour).api("GET", f"kv/{KEY}?raw", timeout=2)
            found.append(value if isinstance(value, dict) else json.loads(value))
        except (httpclient.HTTPError, OSError, ValueError, TypeError):
            continue  # not written yet, or that agent is down: the other one or the mirror
    return found


def record(ctx: Context) -> dict:
    """{"colour", "since" (epoch seconds), "history": [{"colour", "since", ...}]}."""
    kept = [ctx.runtime.read_record(ctx.spec, "live")] if ctx.target == "kubernetes" else [
        *_from_consul(ctx), read_json(_mirror(ctx), default=None)]
    records = [r for r in kept
               if isinstance(r, dict) and r.get("colour") in ctx.spec.mesh.datacenters]
    return max(records, key=lambda r: r.get("since", 0), default={"colour": "blue", "since": 0, "history": []})


def colour(ctx: Context) -> str:
    return record(ctx)["colour"]


def idle(ctx: Context) -> str:
    live = colour(ctx)
    return next(c for c in ctx.spec.mesh.datacenters if c != live)


def write(ctx: Context, new: str, **detail) -> dict:
    """Make `new` the live colour in the datacenters (at least one must take it: the newest
    record wins when they are read) and the mirror."""
    from opsctl.components.mesh import agent
    from opsctl.errors import OpsError

    old = record(ctx)
    entry = {"colour": new, "since": time.time(), **detail}
    data = {**entry, "history": ([entry] + old.get("history", []))[:HISTORY]}
    if ctx.target == "kubernetes":
        ctx.runtime.keep_record(ctx.spec, "live", data)
        return data
    failures = []
    for c in ctx.spec.mesh.datacenters:
        try:
            agent(ctx, c).api("PUT", f"kv/{KEY}", data)
        except (httpclient.HTTPError, OSError) as e:
            failures.append(f"{c}: {e}")
    if len(failures) == len(ctx.spec.mesh.datacenters):
        raise OpsError(f"no datacenter took the live colour ({'; '.join(failures)})",
                       "start Consul: opsctl install --only consul")
    write_json_atomic(_mirror(ctx), data, mode=0o600)
    return data
