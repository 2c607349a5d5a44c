"""The Keycloak realm of the platform, reconciled from platform.yaml with python-keycloak.

What it holds:
- the realm, with short-lived access tokens;
- an RS256 key provider built from a certificate and private key that opsctl generates
  (or the user supplies), kept in Vault, so every token carries that key's `kid`;
- client scopes that add audiences: `scope` (order API + Vault) and `service_scope`
  (Vault + the stock API, which order-creator calls);
- the confidential client people use (`client`) with its client role, a realm role that is
  a composite of it held by the client's service account, and `scope` as default scope;
- one confidential client per bundled service, whose service account holds `service_role`.
Client secrets are generated, kept in Vault, and never printed.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass
from typing import Iterator

from opsctl.components import vault
from opsctl.components.base import Change, ConfigStep
from opsctl.components.keycloak import ADMIN_USER
from opsctl.errors import OpsError

ACCESS_TOKEN_LIFESPAN = 300  # seconds


def server_url(ctx) -> str:
    return ctx.address("keycloak", "http").url()


def issuer(ctx) -> str:
    return f"{server_url(ctx)}/realms/{ctx.spec.names.realm}"


def token_url(ctx) -> str:
    return f"{issuer(ctx)}/protocol/openid-connect/token"


def client_secret(ctx, client_id: str, vault_client=None) -> str:
    """A client's secret, from Vault (where keycloak apply keeps it)."""
    names = ctx.spec.names
    stored = vault.kv_read(ctx, vault_client or vault.admin(ctx),
                           f"{names.vault.clients_path}/{client_id}")
    if not stored:
        raise OpsError(f"no client '{client_id}' in Vault",
                       f"known clients: {', '.join([names.keycloak.client, *ctx.spec.services])}; "
                       "run opsctl keycloak apply if the realm is not configured yet", code=2)
    return stored["client_secret"]


def client_credentials(ctx, client_id: str, secret: str) -> dict:
    """The token endpoint's answer for the client-credentials grant."""
    import json
    import urllib.parse

    from opsctl import httpclient

    # Asked through opsctl's way in (a port-forward on a cluster); the token's issuer is the
    # same whichever way, Keycloak's hostname being fixed on both targets.
    url = ctx.reach("keycloak", "http").url(urllib.parse.urlsplit(token_url(ctx)).path)
    form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": client_id,
                                   "client_secret": secret})
    try:
        return httpclient.request("POST", url, raw=form.encode(), timeout=5,
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})[2]
    except httpclient.HTTPError as e:
        reason = e.body
        try:
            reason = json.loads(e.body).get("error_description") or reason
        except ValueError:
            pass
        raise OpsError(f"Keycloak refused the token for {client_id}: {reason}",
                       "run opsctl keycloak diff to see whether the realm drifted")
    except OSError as e:
        raise OpsError(f"Keycloak is not reachable at {url}: {e}",
                       f"run: {ctx.opsctl('install --only keycloak')}")


@dataclass
class ClientSpec:
    client_id: str
    role: str
    scope: str
    realm_role: str | None = None  # held through this realm role instead of directly
    description: str = ""


def generate_signing_key(realm: str) -> dict:
    """A 2048-bit RSA key and a self-signed certificate for the realm, as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, realm)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=730))
            .sign(key, hashes.SHA256()))
    return {
        "private_key": key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()).decode(),
        "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def public_key(certificate: str) -> str:
    """The PEM public key of the realm's certificate (what checks its tokens' signatures)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(certificate.encode()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _pem_body(pem: str) -> str:
    """Keycloak stores key material as the base64 body of the PEM, without armour."""
    return "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))


def load_signing_key(key_file: str, cert_file: str) -> dict:
    """A user-supplied key and certificate (PEM), checked to belong together."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key_pem, cert_pem = open(key_file).read(), open(cert_file).read()
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except (OSError, ValueError, TypeError) as e:
        raise OpsError(f"cannot use the signing key {key_file} / certificate {cert_file}: {e}",
                       "give an unencrypted PEM RSA private key and its PEM certificate", code=2)
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < 2048:
        raise OpsError("the signing key must be an RSA key of at least 2048 bits (RS256)", code=2)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise OpsError(f"{cert_file} is not the certificate of {key_file}", code=2)
    return {"private_key": key_pem, "certificate": cert_pem}


class KeycloakRealm(ConfigStep):
    after = ("keycloak", "vault")
    on_kubernetes = True  # through port-forwards to Keycloak's and Vault's pods (ctx.reach)

    def __init__(self, name, ctx, signing_key: dict | None = None):
        super().__init__(name, ctx)
        self.names = ctx.spec.names
        self.realm = self.names.realm
        self.supplied_key = signing_key
        self._admin = None
        self._vault = None

    # --- connections ---------------------------------------------------------------
    @property
    def admin(self):
        if self._admin is None:
            from keycloak import KeycloakAdmin
            from keycloak.exceptions import KeycloakError

            password = self.ctx.secret("keycloak", "admin_password")
            url = self.ctx.reach("keycloak", "http").url()  # opsctl's way in, not the issuer's name
            try:
                self._admin = KeycloakAdmin(server_url=url, username=ADMIN_USER,
                                            password=password, realm_name="master",
                                            user_realm_name="master", timeout=10)
                self._admin.get_realms()
            except (KeycloakError, OSError) as e:
                raise OpsError(f"cannot log in to Keycloak at {url}: {e}",
                               f"run: {self.ctx.opsctl('install --only keycloak')}")
        return self._admin

    @property
    def vault(self):
        if self._vault is None:
            self._vault = vault.admin(self.ctx)
        return self._vault

    def clients(self) -> list[ClientSpec]:
        kc = self.names.keycloak
        people = ClientSpec(kc.client, kc.client_role, kc.scope, realm_role=kc.realm_role,
                            description="people and Postman calling the order API")
        services = [ClientSpec(name, kc.service_role, kc.service_scope,
                               description=f"the {name} service")
                    for name in self.ctx.spec.services]
        return [people, *services]

    def scopes(self) -> dict[str, list[str]]:
        kc = self.names.keycloak
        return {kc.scope: [kc.order_api_audience, kc.vault_audience],
                kc.service_scope: [kc.vault_audience, kc.stock_api_audience]}

    def secret_path(self, client_id: str) -> str:
        return f"{self.names.vault.clients_path}/{client_id}"

    def stored_secret(self, client_id: str) -> str | None:
        data = vault.kv_read(self.ctx, self.vault, self.secret_path(client_id))
        return data.get("client_secret") if data else None

    # --- the plan ------------------------------------------------------------------
    def plan(self) -> Iterator[Change]:
        admin = self.admin
        exists = self.realm in {r["realm"] for r in admin.get_realms()}
        if not exists:
            yield Change("create", f"realm {self.realm}", apply=lambda: admin.create_realm(
                {"realm": self.realm, "enabled": True,
                 "accessTokenLifespan": ACCESS_TOKEN_LIFESPAN}, skip_exists=True))
        else:
            current = admin.get_realm(self.realm)
            if not current.get("enabled") or current.get("accessTokenLifespan") != ACCESS_TOKEN_LIFESPAN:
                yield Change("update", f"realm {self.realm}", "enabled, access token lifespan",
                             apply=lambda: admin.update_realm(self.realm, {
                                 "enabled": True, "accessTokenLifespan": ACCESS_TOKEN_LIFESPAN}))
        admin.change_current_realm(self.realm)
        live = exists or not self.ctx.dry_run  # in a dry run, a realm to create is empty
        yield from self._signing_key(live)
        for scope, audiences in self.scopes().items():
            yield from self._scope(scope, audiences, live)
        yield from self._realm_role(live)
        for client in self.clients():
            yield from self._client(client, live)

    def _signing_key(self, live: bool) -> Iterator[Change]:
        admin, name = self.admin, self.names.keycloak.signing_key
        path = self.names.vault.signing_key_path
        stored = vault.kv_read(self.ctx, self.vault, path)
        wanted = self.supplied_key or stored
        if wanted is None or (self.supplied_key and stored != self.supplied_key):
            wanted = wanted or generate_signing_key(self.realm)
            key = wanted
            yield Change("create" if stored is None else "update", f"signing key in Vault {path}",
                         apply=lambda: vault.kv_write(self.ctx, self.vault, path, key))
        components = admin.get_components({"type": "org.keycloak.keys.KeyProvider",
                                           "name": name}) if live else []
        config = {
            "priority": ["200"], "enabled": ["true"], "active": ["true"], "algorithm": ["RS256"],
            "privateKey": [_pem_body(wanted["private_key"])],
            "certificate": [_pem_body(wanted["certificate"])],
        }
        if not components:
            realm_id = admin.get_realm(self.realm)["id"] if live else None
            yield Change("create", f"RS256 key provider {name}", apply=lambda: admin.create_component({
                "name": name, "providerId": "rsa", "providerType": "org.keycloak.keys.KeyProvider",
                "parentId": realm_id or admin.get_realm(self.realm)["id"], "config": config}))
            return
        current = components[0]
        if current["config"].get("certificate") != config["certificate"] or any(
                current["config"].get(k) != config[k] for k in ("priority", "active", "algorithm")):
            yield Change("update", f"RS256 key provider {name}", "certificate or settings differ",
                         apply=lambda: admin.update_component(current["id"], {**current, "config": config}))

    def _scope(self, scope: str, audiences: list[str], live: bool) -> Iterator[Change]:
        admin = self.admin
        found = admin.get_client_scope_by_name(scope) if live else None
        if not found:
            yield Change("create", f"client scope {scope}", f"audiences {', '.join(audiences)}",
                         apply=lambda: admin.create_client_scope({
                             "name": scope, "protocol": "openid-connect",
                             "attributes": {"include.in.token.scope": "true",
                                            "display.on.consent.screen": "false"}}, skip_exists=True))
        mappers = {m["name"]: m for m in (found or {}).get("protocolMappers", [])}
        for audience in audiences:
            mapper = f"audience {audience}"
            config = {"included.custom.audience": audience, "access.token.claim": "true",
                      "id.token.claim": "false", "introspection.token.claim": "true"}
            if mapper in mappers and mappers[mapper]["config"].get("included.custom.audience") == audience:
                continue
            yield Change("create", f"audience mapper {audience} in scope {scope}",
                         apply=lambda config=config, mapper=mapper: admin.add_mapper_to_client_scope(
                             admin.get_client_scope_by_name(scope)["id"],
                             {"name": mapper, "protocol": "openid-connect",
                              "protocolMapper": "oidc-audience-mapper", "config": config}))

    def _realm_role(self, live: bool) -> Iterator[Change]:
        from keycloak.exceptions import KeycloakGetError

        admin, kc = self.admin, self.names.keycloak
        try:
            role = admin.get_realm_role(kc.realm_role) if live else None
        except KeycloakGetError:
            role = None
        if role is None:
            yield Change("create", f"realm role {kc.realm_role}",
                         apply=lambda: admin.create_realm_role(
                             {"name": kc.realm_role, "composite": True}, skip_exists=True))

    def _client(self, spec: ClientSpec, live: bool) -> Iterator[Change]:
        admin = self.admin
        uuid = admin.get_client_id(spec.client_id) if live else None
        secret = self.stored_secret(spec.client_id)
        if secret is None:
            new_secret = secrets.token_urlsafe(32)
            yield Change("create", f"client secret of {spec.client_id} in Vault",
                         apply=lambda: vault.kv_write(self.ctx, self.vault,
                                                      self.secret_path(spec.client_id),
                                                      {"client_id": spec.client_id,
                                                       "client_secret": new_secret}))
            secret = new_secret
        payload = {
            "clientId": spec.client_id, "name": spec.client_id, "description": spec.description,
            "enabled": True, "protocol": "openid-connect", "publicClient": False,
            "clientAuthenticatorType": "client-secret", "serviceAccountsEnabled": True,
            "standardFlowEnabled": False, "implicitFlowEnabled": False,
            "directAccessGrantsEnabled": False, "secret": secret,
        }
        if uuid is None:
            yield Change("create", f"client {spec.client_id}", "confidential, service account",
                         apply=lambda: admin.create_client(payload, skip_exists=True))
        else:
            current = admin.get_client(uuid)
            differs = [k for k, v in payload.items() if k not in ("secret", "description")
                       and current.get(k) != v]
            if admin.get_client_secrets(uuid).get("value") != secret:
                differs.append("secret")
            if differs:
                yield Change("update", f"client {spec.client_id}", ", ".join(differs),
                             apply=lambda: admin.update_client(uuid, payload))
        yield from self._client_links(spec, uuid)

    def _client_links(self, spec: ClientSpec, uuid: str | None) -> Iterator[Change]:
        """Role, default scope and service-account roles of a client."""
        from keycloak.exceptions import KeycloakGetError

        admin = self.admin

        def client_uuid() -> str:
            return uuid or admin.get_client_id(spec.client_id)

        try:
            role = admin.get_client_role(uuid, spec.role) if uuid else None
        except KeycloakGetError:
            role = None
        if role is None:
            yield Change("create", f"client role {spec.client_id}/{spec.role}",
                         apply=lambda: admin.create_client_role(client_uuid(), {"name": spec.role},
                                                                skip_exists=True))
        scopes = {s["name"] for s in admin.get_client_default_client_scopes(uuid)} if uuid else set()
        if spec.scope not in scopes:
            def add_scope():
                scope_id = admin.get_client_scope_by_name(spec.scope)["id"]
                admin.add_client_default_client_scope(client_uuid(), scope_id, {
                    "realm": self.realm, "client": client_uuid(), "clientScopeId": scope_id})
            yield Change("update", f"client {spec.client_id}", f"default scope {spec.scope}",
                         apply=add_scope)
        if spec.realm_role:
            composites = set()
            if uuid:
                try:
                    composites = {r["name"] for r in
                                  admin.get_composite_realm_roles_of_role(spec.realm_role)}
                except KeycloakGetError:
                    pass
            if spec.role not in composites:
                yield Change("update", f"realm role {spec.realm_role}", f"composite of {spec.role}",
                             apply=lambda: admin.add_composite_realm_roles_to_role(
                                 spec.realm_role, [admin.get_client_role(client_uuid(), spec.role)]))
        held = set()
        if uuid:
            user = admin.get_client_service_account_user(uuid)
            if spec.realm_role:
                held = {r["name"] for r in admin.get_realm_roles_of_user(user["id"])}
            else:
                held = {r["name"] for r in admin.get_client_roles_of_user(user["id"], uuid)}
        wanted = spec.realm_role or spec.role
        if wanted not in held:
            def assign():
                user_id = admin.get_client_service_account_user(client_uuid())["id"]
                if spec.realm_role:
                    admin.assign_realm_roles(user_id, [admin.get_realm_role(spec.realm_role)])
                else:
                    admin.assign_client_role(user_id, client_uuid(),
                                             [admin.get_client_role(client_uuid(), spec.role)])
            yield Change("update", f"service account of {spec.client_id}", f"holds {wanted}",
                         apply=assign)
