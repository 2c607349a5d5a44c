"""opsctl keycloak: the platform's realm, reconciled from platform.yaml."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands import reconcile
from opsctl.commands.common import (KubeconfigOption, KubeContextOption, OutputOption, TargetOption, context,
                                   set_output)

app = typer.Typer(help="The Keycloak realm: clients, roles, scopes, signing key.",
                  no_args_is_help=True)


@app.command()
def apply(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes; make none.")] = False,
    signing_key: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Your RSA private key (PEM) for the realm's RS256 key provider.")] = None,
    signing_cert: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Its certificate (PEM).")] = None,
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Create or update the realm so it matches the spec; says what it changed."""
    set_output(output)
    from opsctl.app import config

    steps = config.realm_steps(context(target, dry_run, kube_context, kubeconfig), signing_key, signing_cert)
    reconcile.render(config.apply(steps, dry_run), output, "keycloak")


@app.command()
def diff(target: TargetOption = None, kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
         output: OutputOption = ui.Output.text) -> None:
    """Drift between the spec and the live realm, per object. Exits 0 in sync, 1 on drift, 2 on an error."""
    set_output(output)
    from opsctl.app import config

    steps = lambda: config.realm_steps(context(target, True, kube_context, kubeconfig))  # noqa: E731
    reconcile.render(config.diff(steps), output, "keycloak")
