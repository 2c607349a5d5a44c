"""opsctl token: an access token for people (and Postman), by the client-credentials grant."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output
from opsctl.errors import UsageError


def _decode(token: str) -> dict:
    """Header and claims, for reading: the signature is not checked here."""
    def part(segment: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))

    header, claims, _ = token.split(".")
    return {"header": part(header), "claims": part(claims)}


def token(
    client: Annotated[Optional[str], typer.Option(
        "--client", metavar="ID", help="Keycloak client [default: names.keycloak.client].")] = None,
    decode: Annotated[bool, typer.Option(
        "--decode", help="Print the token's header and claims instead of the token.")] = False,
    postman_env: Annotated[Optional[str], typer.Option(
        "--postman-env", metavar="FILE",
        help="Create or update this Postman environment (mode 0600) with the token "
             "and base_url, the edge.")] = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Get an access token by the client-credentials grant; the client secret comes from Vault."""
    set_output(output)
    from opsctl.components import keycloak_realm

    ctx = context()
    client = client or ctx.spec.names.keycloak.client
    secret = keycloak_realm.client_secret(ctx, client)
    answer = keycloak_realm.client_credentials(ctx, client, secret)
    access = answer["access_token"]
    if postman_env:
        from opsctl import postman
        from opsctl.components.nginx import edge_url

        try:
            postman.write_environment(postman_env, postman.environment(
                f"{ctx.spec.platform.name} ({ctx.target})", edge_url(ctx),
                keycloak_realm.token_url(ctx), client, secret, access))
        except (ValueError, OSError) as e:
            raise UsageError(str(e), "or give another --postman-env path")
        ui.info(f"Postman environment written: {postman_env}")
    if output == ui.Output.json:
        ui.print_json({"access_token": access, "token_type": answer.get("token_type"),
                       "expires_in": answer.get("expires_in"), "scope": answer.get("scope"),
                       **(_decode(access) if decode else {})})
    elif decode:
        ui.print_json(_decode(access))
    else:
        ui.out(access)
