"""The bundled services: start, stop, status and logs, through the target (ctx.runtime)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from opsctl.app import Result, in_parallel
from opsctl.components.services import BundledService
from opsctl.context import Context
from opsctl.errors import FAILED, UNHEALTHY, OpsError, UsageError


def selected(ctx: Context, names: list[str] | None, everything: bool = False) -> list[str]:
    """The services named, else those started with the platform (or all: `everything`)."""
    known = list(ctx.spec.services)
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise UsageError(f"unknown service(s): {', '.join(unknown)}", f"services are: {', '.join(known)}")
    return names or [n for n in known if everything or ctx.spec.services[n].autostart]


def start(ctx: Context, names: list[str] | None) -> Result:
    """Start services (or restart those whose settings changed), each with its client secret."""
    from opsctl.components import keycloak_realm, vault

    client = vault.admin(ctx)
    rows, code = [], 0
    for name in selected(ctx, names):
        try:
            secret = keycloak_realm.client_secret(ctx, name, client)
            outcome = BundledService(name, ctx, secret).reconcile()
            rows.append({"service": name, "state": outcome.state, "detail": outcome.detail})
        except OpsError as e:
            code = FAILED
            rows.append({"service": name, "state": "failed",
                         "detail": e.message + (f" ({e.hint})" if e.hint else "")})
    return Result({"services": rows}, code)


def stop(ctx: Context, names: list[str] | None) -> Result:
    services = [BundledService(name, ctx) for name in selected(ctx, names, everything=True)]
    stopped = in_parallel(services, lambda s: s.stop())
    return Result({"services": [{"service": s.name, "stopped": was} for s, was in zip(services, stopped)]})


def status(ctx: Context, names: list[str] | None) -> Result:
    healths = in_parallel([BundledService(name, ctx) for name in selected(ctx, names)], lambda s: s.health())
    return Result({"services": [asdict(h) for h in healths]},
                  0 if all(h.ok for h in healths) else UNHEALTHY)


def logfile(ctx: Context, name: str) -> Path:
    selected(ctx, [name])
    path = ctx.runtime.logfile(BundledService(name, ctx))
    if not path.exists():
        raise UsageError(f"{name} has no log yet ({path})", f"start it: opsctl services start {name}")
    return path
