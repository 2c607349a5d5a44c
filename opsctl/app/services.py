"""The bundled services: start, stop, status and logs, through the target (ctx.runtime)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from opsctl.app import Result, in_parallel
from opsctl.components.services import instances
from opsctl.context import Context
from opsctl.errors import FAILED, UNHEALTHY, OpsError, UsageError


def selected(ctx: Context, names: list[str] | None, everything: bool = False) -> list[str]:
    """The services named, else those started with the platform (or all: `everything`)."""
    known = list(ctx.spec.services)
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise UsageError(f"unknown service(s): {', '.join(unknown)}", f"services are: {', '.join(known)}")
    return names or [n for n in known if everything or ctx.spec.services[n].autostart]


def _colour(ctx: Context, colour: str | None) -> str | None:
    if colour and colour not in ctx.spec.mesh.datacenters:
        raise UsageError(f"unknown colour {colour!r}", f"colours are: {', '.join(ctx.spec.mesh.datacenters)}")
    return colour


def start(ctx: Context, names: list[str] | None, colour: str | None = None) -> Result:
    """Start services (or restart those whose settings changed), each with its client secret:
    an HTTP service in each colour (or in `colour`), a worker on the live colour's build."""
    from opsctl.components import keycloak_realm, vault

    client, colour = vault.admin(ctx), _colour(ctx, colour)
    rows, code = [], 0
    for name in selected(ctx, names):
        try:
            secret = keycloak_realm.client_secret(ctx, name, client)
            for instance in instances(ctx, name, secret, colour):
                outcome = instance.reconcile()
                rows.append({"service": instance.name, "state": outcome.state, "detail": outcome.detail})
        except OpsError as e:
            code = FAILED
            rows.append({"service": name, "state": "failed",
                         "detail": e.message + (f" ({e.hint})" if e.hint else "")})
    return Result({"services": rows}, code)


def stop(ctx: Context, names: list[str] | None, colour: str | None = None) -> Result:
    colour = _colour(ctx, colour)
    services = [i for name in selected(ctx, names, everything=True) for i in instances(ctx, name, colour=colour)]
    stopped = in_parallel(services, lambda s: s.stop())
    return Result({"services": [{"service": s.name, "stopped": was} for s, was in zip(services, stopped)]})


def status(ctx: Context, names: list[str] | None, colour: str | None = None) -> Result:
    colour = _colour(ctx, colour)
    services = [i for name in selected(ctx, names) for i in instances(ctx, name, colour=colour)]
    healths = in_parallel(services, lambda s: s.health())
    return Result({"services": [asdict(h) for h in healths]},
                  0 if all(h.ok for h in healths) else UNHEALTHY)


def logfile(ctx: Context, name: str, colour: str | None = None) -> Path:
    from opsctl.components import live

    selected(ctx, [name])
    (instance,) = instances(ctx, name, colour=_colour(ctx, colour) or (
        live.colour(ctx) if ctx.spec.services[name].per_colour else None))
    path = ctx.runtime.logfile(instance)
    if not path.exists():
        raise UsageError(f"{instance.name} has no log yet ({path})", f"start it: opsctl services start {name}")
    return path
