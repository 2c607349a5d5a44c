"""apply and diff of the configuration steps (the Keycloak realm, Vault's auth and the
services' credentials, the RabbitMQ topology), like keycloak-config-cli and kubectl diff."""

from __future__ import annotations

from typing import Callable

from opsctl.app import Result
from opsctl.components import build
from opsctl.components.base import ConfigStep
from opsctl.context import Context
from opsctl.errors import FAILED, USAGE, OpsError, UsageError

def realm_steps(ctx: Context, key: str | None = None, cert: str | None = None) -> list[ConfigStep]:
    """The realm step, with the user's own signing key and certificate if given; on a
    cluster, Vault's JWT auth after it, which trusts the realm's signing key there."""
    from opsctl.components.keycloak_realm import KeycloakRealm, load_signing_key

    if bool(key) != bool(cert):
        raise UsageError("--signing-key and --signing-cert go together",
                         "give both files (PEM), or neither to let opsctl generate them")
    realm = KeycloakRealm("keycloak-realm", ctx, load_signing_key(key, cert) if key else None)
    return [realm] + ([build("vault-auth", ctx)] if ctx.target == "kubernetes" else [])


def topology(ctx: Context, recreate: bool = False, force: bool = False) -> ConfigStep:
    if force and not recreate:
        raise UsageError("--force only makes sense with --recreate")
    step = build("rabbitmq-topology", ctx)
    step.recreate, step.force = recreate, force
    return step


def vault_steps(ctx: Context) -> list[ConfigStep]:
    """Vault's JWT auth, policy and roles, and the services' credentials it holds."""
    return [build("vault-auth", ctx), build("service-credentials", ctx)]


def apply(steps: list[ConfigStep], dry_run: bool) -> Result:
    """Plan (and unless dry_run, apply) each step's changes."""
    changes = [change for step in steps for change in step.changes(apply=not dry_run)]
    return Result({"dry_run": dry_run, "in_sync": not changes,
                   "changes": [{"action": c.action, "object": c.target, "detail": c.detail} for c in changes]})


def diff(make_steps: Callable[[], list[ConfigStep]]) -> Result:
    """Exit 0 when in sync, 1 when something differs, 2 or more when the comparison could
    not be made (a server down, a bad file), so that a script reading 1 always sees drift."""
    try:
        result = apply(make_steps(), dry_run=True)
    except OpsError as e:
        e.code = max(e.code, USAGE)
        raise
    result.code = 0 if result.data["in_sync"] else FAILED
    return result


def queue_status(ctx: Context) -> Result:
    from opsctl.errors import UNHEALTHY

    rows = topology(ctx).queue_status()
    return Result({"queues": rows}, 0 if all(r["exists"] for r in rows) else UNHEALTHY)
