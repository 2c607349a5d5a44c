"""opsctl token: an access token for people (and Postman), by the client-credentials grant."""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output
from opsctl.errors import OpsError, UsageError


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
        help="Create or update this Postman environment (mode 0600) with the token.")] = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Get an access token by the client-credentials grant; the client secret comes from Vault."""
    set_output(output)
    from opsctl import httpclient
    from opsctl.components import vault

    ctx = context()
    names = ctx.spec.names
    client = client or names.keycloak.client
    stored = vault.kv_read(ctx, vault.admin(ctx), f"{names.vault.clients_path}/{client}")
    if not stored:
        raise UsageError(f"no client '{client}' in Vault",
                         f"known clients: {', '.join([names.keycloak.client, *ctx.spec.services])}; "
                         "run opsctl keycloak apply if the realm is not configured yet")
    keycloak = ctx.spec.components["keycloak"]
    token_url = (f"http://{ctx.host}:{keycloak.ports['http']}/realms/{names.realm}"
                 "/protocol/openid-connect/token")
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client,
                                   "client_secret": stored["client_secret"]})
    try:
        _, _, answer = httpclient.request(
            "POST", token_url, raw=form.encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=5)
    except httpclient.HTTPError as e:
        reason = e.body
        try:
            reason = json.loads(e.body).get("error_description") or reason
        except ValueError:
            pass
        raise OpsError(f"Keycloak refused the token for {client}: {reason}",
                       "run opsctl keycloak diff to see whether the realm drifted")
    except OSError as e:
        raise OpsError(f"Keycloak is not reachable at {token_url}: {e}",
                       "run: opsctl install --only keycloak")
    access = answer["access_token"]
    if postman_env:
        from opsctl import postman

        api = ctx.spec.services.get("order-creator")
        base_url = f"http://{ctx.host}:{api.port}" if api and api.port else ""
        try:
            postman.write_environment(postman_env, postman.environment(
                f"{ctx.spec.platform.name} ({ctx.target})", base_url, token_url, client,
                stored["client_secret"], access))
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
        print(access)
