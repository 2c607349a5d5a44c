"""opsctl token: an access token for people (and Postman), by the client-credentials grant."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands.common import (KubeconfigOption, KubeContextOption, OutputOption, TargetOption, context,
                                   set_output)


def token(
    client: Annotated[Optional[str], typer.Option(
        "--client", metavar="ID", help="Keycloak client [default: names.keycloak.client].")] = None,
    decode: Annotated[bool, typer.Option(
        "--decode", help="Print the token's header and claims instead of the token.")] = False,
    postman_env: Annotated[Optional[str], typer.Option(
        "--postman-env", metavar="FILE",
        help="Create or update this Postman environment (mode 0600) with the token "
             "and base_url, the edge.")] = None,
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Get an access token by the client-credentials grant; the client secret comes from Vault."""
    set_output(output)
    from opsctl.app import identity

    result = identity.token(context(target, False, kube_context, kubeconfig), client, postman_env).data
    if postman_env:
        ui.info(f"Postman environment written: {postman_env}")
    access = result["access_token"]
    if output == ui.Output.json:
        ui.print_json({**result, **(identity.decode(access) if decode else {})})
    elif decode:
        ui.print_json(identity.decode(access))
    else:
        ui.out(access)
