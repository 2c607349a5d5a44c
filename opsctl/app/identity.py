"""Tokens for people and Postman: the client-credentials grant (the secret from Vault), a
Postman environment and collection of the order APIs."""

from __future__ import annotations

import base64
import json

from opsctl.app import Result
from opsctl.components import keycloak_realm
from opsctl.components.nginx import edge_url
from opsctl.context import Context
from opsctl.errors import UsageError


def decode(token: str) -> dict:
    """Header and claims, for reading: the signature is not checked here."""
    def part(segment: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))

    header, claims, _ = token.split(".")
    return {"header": part(header), "claims": part(claims)}


def token(ctx: Context, client: str | None, postman_env: str | None = None) -> Result:
    """An access token of `client` (default: the people's client); with `postman_env`, a
    Postman environment holding it, the token endpoint and the edge's URL is written too."""
    if postman_env and ctx.target == "kubernetes":
        raise UsageError("--postman-env is for the local target: on a cluster, the edge's and Keycloak's "
                         "addresses in it would be names only the cluster resolves",
                         "take the token alone (opsctl token --target kubernetes) and reach the edge with "
                         f"kubectl port-forward -n {ctx.spec.kubernetes.namespace('nginx')} service/nginx")
    client = client or ctx.spec.names.keycloak.client
    secret = keycloak_realm.client_secret(ctx, client)
    answer = keycloak_realm.client_credentials(ctx, client, secret)
    access = answer["access_token"]
    if postman_env:
        from opsctl import postman

        try:
            postman.write_environment(postman_env, postman.environment(
                f"{ctx.spec.platform.name} ({ctx.target})", edge_url(ctx),
                keycloak_realm.token_url(ctx), client, secret, access))
        except (ValueError, OSError) as e:
            raise UsageError(str(e), "or give another --postman-env path")
    return Result({"access_token": access, "token_type": answer.get("token_type"),
                   "expires_in": answer.get("expires_in"), "scope": answer.get("scope")})


def postman_collection(ctx: Context, file: str) -> Result:
    """A Postman v2.1 collection of the order APIs (through the edge) that fetches its token."""
    from opsctl import postman

    postman.write_collection(file, postman.collection(
        edge_url(ctx), keycloak_realm.token_url(ctx), ctx.spec.names.keycloak.client))
    return Result({"collection": file})
