"""Vault's side of identity: the KV v2 engine, JWT login with Keycloak tokens, and the
policy that lets each service read its own secrets only.

- JWT auth at `jwt_path`, trusting the realm (through OIDC discovery; on a cluster, its
  signing key), with a bound issuer;
- policy `reader_policy`: read on <kv_mount>/<name of the login's entity alias>; the JWT
  roles take that name from the token's `azp` (the service's client id), so one policy
  gives every service its own path and nothing else;
- one role per service: the token must carry the Vault audience, come from that service's
  client, and hold its service role; Vault tokens are short-lived.
"""

from __future__ import annotations

from typing import Iterator

from opsctl.components import keycloak_realm, vault
from opsctl.components.base import Change, ConfigStep
from opsctl.errors import OpsError


def _plain(value):
    """A value as Vault gives it back: its keys' PEM without the surrounding blank lines."""
    return [str(v).strip() for v in value] if isinstance(value, list) else value


def seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


class VaultAuth(ConfigStep):
    after = ("vault", "keycloak-realm")
    on_kubernetes = True  # through a port-forward to Vault's pod (ctx.reach)

    @property
    def issuer(self) -> str:
        return keycloak_realm.issuer(self.ctx)

    def policy(self, accessor: str) -> str:
        mount = self.ctx.spec.names.vault.kv_mount
        return (f'# Each service reads its own secrets only: the entity alias is its client id.\n'
                f'path "{mount}/data/{{{{identity.entity.aliases.{accessor}.name}}}}" {{\n'
                f'  capabilities = ["read"]\n}}\n')

    def role(self, service: str) -> dict:
        names, settings = self.ctx.spec.names, self.ctx.spec.vault
        return {
            "role_type": "jwt",
            "bound_audiences": [names.keycloak.vault_audience],
            "user_claim": "azp",
            "bound_claims_type": "string",
            "bound_claims": {"azp": service,
                             f"/resource_access/{service}/roles": names.keycloak.service_role},
            "token_policies": [names.vault.reader_policy],
            "token_ttl": seconds(settings.token_ttl),
            "token_max_ttl": seconds(settings.token_max_ttl),
            "token_type": "service",
        }

    def jwt_config(self, client) -> dict:
        """How Vault checks a service's token. Locally through the realm's OIDC discovery,
        which follows a new signing key by itself. On a cluster against the realm's own key
        (kept in Vault by keycloak-realm): the NetworkPolicies give Vault no way to Keycloak
        there, and a new key goes through install, which runs this step after the realm's."""
        if self.ctx.target != "kubernetes":
            return {"oidc_discovery_url": self.issuer, "bound_issuer": self.issuer}
        path = self.ctx.spec.names.vault.signing_key_path
        stored = vault.kv_read(self.ctx, client, path)
        if not stored:
            raise OpsError(f"the realm's signing key is not in Vault ({path}) yet",
                           "configure the realm first: opsctl install --target kubernetes --only keycloak-realm")
        return {"jwt_validation_pubkeys": [keycloak_realm.public_key(stored["certificate"])],
                "bound_issuer": self.issuer}

    def plan(self) -> Iterator[Change]:
        client = vault.admin(self.ctx)
        names = self.ctx.spec.names.vault
        mounts = client.sys.list_mounted_secrets_engines()["data"]
        if f"{names.kv_mount}/" not in mounts:
            yield Change("create", f"KV v2 secrets engine at {names.kv_mount}/",
                         apply=lambda: vault.ensure_kv_mount(self.ctx, client))

        path = names.jwt_path
        auths = client.sys.list_auth_methods()["data"]
        if f"{path}/" not in auths:
            yield Change("create", f"JWT auth method at {path}/",
                         apply=lambda: client.sys.enable_auth_method("jwt", path=path))
        config = self.jwt_config(client)
        current = (client.read(f"auth/{path}/config") or {}).get("data", {}) if f"{path}/" in auths else {}
        if any(_plain(current.get(k)) != _plain(v) for k, v in config.items()):
            yield Change("update", f"JWT auth {path}/ config", f"trusts {self.issuer}",
                         apply=lambda: client.write_data(f"auth/{path}/config", data=config))

        accessor = client.sys.list_auth_methods()["data"].get(f"{path}/", {}).get("accessor", "<accessor>")
        policy = self.policy(accessor)
        existing = client.sys.list_acl_policies()["data"]["keys"]
        current_rules = (client.sys.read_acl_policy(names.reader_policy)["data"]["policy"]
                         if names.reader_policy in existing else None)
        if current_rules != policy:
            yield Change("create" if current_rules is None else "update", f"policy {names.reader_policy}",
                         apply=lambda: client.sys.create_or_update_acl_policy(
                             names.reader_policy, self.policy(
                                 client.sys.list_auth_methods()["data"][f"{path}/"]["accessor"])))

        for service in self.ctx.spec.services:
            wanted = self.role(service)
            current = (client.read(f"auth/{path}/role/{service}") or {}).get("data") if f"{path}/" in auths else None
            if current is None:
                yield Change("create", f"JWT role {service}",
                             apply=lambda s=service, w=wanted: client.write_data(f"auth/{path}/role/{s}", data=w))
            elif any(current.get(k) != v for k, v in wanted.items()):
                differs = ", ".join(k for k, v in wanted.items() if current.get(k) != v)
                yield Change("update", f"JWT role {service}", differs,
                             apply=lambda s=service, w=wanted: client.write_data(f"auth/{path}/role/{s}", data=w))
