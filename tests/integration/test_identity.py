"""Identity and secrets on the real Keycloak and OpenBao: realm, tokens, Vault login, drift."""

import base64
import json
import os
import subprocess

import hvac
import pytest

from opsctl import httpclient
from tests.integration.conftest import NAMES, Workdir, port_override, reachable_dir

pytestmark = pytest.mark.integration

SERVICES = ["order-creator", "stock-service", "premium-consumer", "regular-consumer",
            "digital-consumer", "cdc-bridge"]


def token(platform, *args) -> dict:
    result = platform.run("token", "-o", "json", "--decode", *args, check_json=True)
    assert result.returncode == 0, result.stderr
    return result.json


def vault_client(platform, token: str | None = None) -> hvac.Client:
    return hvac.Client(url=f"http://127.0.0.1:{platform.port('vault', 'http')}", token=token)


def root(platform) -> hvac.Client:
    """Vault as opsctl administers it: with its admin token (the root token is revoked)."""
    record = json.loads((platform.path / ".opsctl" / "vault-admin.json").read_text())
    return vault_client(platform, record["token"])


def keycloak_url(platform) -> str:
    return f"http://127.0.0.1:{platform.port('keycloak', 'http')}"


def keycloak_admin(platform):
    from keycloak import KeycloakAdmin

    admin = KeycloakAdmin(server_url=keycloak_url(platform), username="opsctl-admin",
                          password=platform.admin_secret("keycloak", "admin_password"), realm_name="master",
                          user_realm_name="master")
    admin.change_current_realm(platform.names.realm)
    return admin


def test_install_configured_identity_and_everything_is_in_sync(platform):
    code, steps = platform.first_install
    for name in ("keycloak-realm", "vault-auth", "service-credentials"):
        assert steps[name]["state"] == "changed", steps[name]
    for group in ("keycloak", "vault"):
        diff = platform.run(group, "diff")
        assert diff.returncode == 0, diff.stdout + diff.stderr
        apply = platform.run(group, "apply")
        assert apply.returncode == 0 and "in sync, nothing to change" in apply.stderr


def test_people_token_carries_key_id_audiences_and_roles(platform):
    answer = token(platform)
    header, claims = answer["header"], answer["claims"]
    assert header["alg"] == "RS256"
    assert claims["iss"] == f"{keycloak_url(platform)}/realms/{platform.names.realm}"
    assert {NAMES.keycloak.order_api_audience, "vault"} <= set(claims["aud"])
    assert NAMES.keycloak.client_role in claims["resource_access"][NAMES.keycloak.client]["roles"]
    assert NAMES.keycloak.realm_role in claims["realm_access"]["roles"]
    assert NAMES.keycloak.scope in claims["scope"].split()

    # The kid is that of the key opsctl generated and keeps in Vault.
    cert = root(platform).secrets.kv.v2.read_secret_version(
        path=NAMES.vault.signing_key_path, mount_point=NAMES.vault.kv_mount, raise_on_deleted_version=True,
    )["data"]["data"]["certificate"]
    body = "".join(l for l in cert.strip().splitlines() if not l.startswith("-----"))
    certs = httpclient.get(f"{keycloak_url(platform)}/realms/{platform.names.realm}"
                           "/protocol/openid-connect/certs")
    ours = [k for k in certs["keys"] if k.get("x5c", [None])[0] == body]
    assert len(ours) == 1 and ours[0]["kid"] == header["kid"]


def test_token_is_printed_raw_for_scripts(platform):
    result = platform.run("token")
    assert result.returncode == 0
    assert result.stdout.count(".") == 2 and result.stdout.strip().startswith("eyJ")


def test_service_token_logs_in_to_vault_and_reads_only_its_own_secret(platform):
    for service in SERVICES:
        jwt = token(platform, "--client", service)["access_token"]
        client = vault_client(platform)
        login = client.auth.jwt.jwt_login(role=service, jwt=jwt, path=NAMES.vault.jwt_path)
        assert login["auth"]["lease_duration"] <= 300
        assert NAMES.vault.reader_policy in login["auth"]["policies"]
        secret = client.secrets.kv.v2.read_secret_version(
            path=service, mount_point=NAMES.vault.kv_mount, raise_on_deleted_version=True)["data"]["data"]
        assert secret, service
        other = next(s for s in SERVICES if s != service)
        with pytest.raises(hvac.exceptions.Forbidden):
            client.secrets.kv.v2.read_secret_version(path=other, mount_point=NAMES.vault.kv_mount,
                                                     raise_on_deleted_version=True)
        with pytest.raises(hvac.exceptions.Forbidden):
            client.secrets.kv.v2.read_secret_version(path=f"{NAMES.vault.clients_path}/{NAMES.keycloak.client}",
                                                     mount_point=NAMES.vault.kv_mount,
                                                     raise_on_deleted_version=True)


def test_a_token_cannot_log_in_as_another_service(platform):
    jwt = token(platform, "--client", "order-creator")["access_token"]
    with pytest.raises(hvac.exceptions.InvalidRequest):
        vault_client(platform).auth.jwt.jwt_login(role="stock-service", jwt=jwt, path=NAMES.vault.jwt_path)
    people = token(platform)["access_token"]  # has the vault audience, not the service role
    with pytest.raises(hvac.exceptions.InvalidRequest):
        vault_client(platform).auth.jwt.jwt_login(role="order-creator", jwt=people, path=NAMES.vault.jwt_path)


def test_service_credentials_in_vault_work_against_the_real_servers(platform):
    import psycopg
    import redis
    from pymongo import MongoClient

    secrets = {s: root(platform).secrets.kv.v2.read_secret_version(
        path=s, mount_point=NAMES.vault.kv_mount, raise_on_deleted_version=True)["data"]["data"] for s in SERVICES}
    stock = secrets["stock-service"]
    with psycopg.connect(host="127.0.0.1", port=platform.port("postgres", "postgres"),
                         user=stock["postgres_username"], password=stock["postgres_password"],
                         dbname=NAMES.postgres.database) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS probe (id int)")
    creator = secrets["order-creator"]
    r = redis.Redis(port=platform.port("redis", "redis"), username=creator["redis_username"],
                    password=creator["redis_password"])
    assert r.set("order:probe", "1") and r.get("order:probe") == b"1"
    with pytest.raises(redis.ResponseError):  # no administration for services
        r.execute_command("CONFIG", "GET", "dir")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=platform.port("redis", "redis"), username=creator["redis_username"],
                    password="wrong").ping()
    regular = secrets["regular-consumer"]
    with MongoClient(f"mongodb://127.0.0.1:{platform.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                     username=regular["mongodb_username"], password=regular["mongodb_password"],
                     authSource=NAMES.mongodb.database, serverSelectionTimeoutMS=3000) as mongo:
        mongo[NAMES.mongodb.database].probe.insert_one({"ok": 1})
    premium = secrets["premium-consumer"]
    assert {"rabbitmq_username", "rabbitmq_password", "postgres_username"} <= set(premium)
    users = httpclient.get(f"http://127.0.0.1:{platform.port('rabbitmq', 'management')}/api/users",
                           auth=("opsctl-admin", platform.admin_secret("rabbitmq", "admin_password")))
    assert premium["rabbitmq_username"] in {u["name"] for u in users}


def test_keycloak_drift_is_shown_per_object_and_repaired(platform):
    admin = keycloak_admin(platform)
    uuid = admin.get_client_id(NAMES.keycloak.client)
    user = admin.get_client_service_account_user(uuid)
    admin.delete_realm_roles_of_user(user["id"], [admin.get_realm_role(NAMES.keycloak.realm_role)])
    admin.update_realm(platform.names.realm, {"accessTokenLifespan": 3600})

    diff = platform.run("keycloak", "diff", "-o", "json", check_json=True)
    assert diff.returncode == 1
    objects = {c["object"] for c in diff.json["changes"]}
    assert objects == {f"realm {platform.names.realm}", f"service account of {NAMES.keycloak.client}"}
    apply = platform.run("keycloak", "apply")
    assert apply.returncode == 0 and "changed 2" in apply.stdout
    assert platform.run("keycloak", "diff").returncode == 0
    assert NAMES.keycloak.realm_role in token(platform)["claims"]["realm_access"]["roles"]


def test_vault_drift_is_shown_and_repaired(platform):
    client = root(platform)
    client.delete("auth/jwt/role/cdc-bridge")
    diff = platform.run("vault", "diff", "-o", "json", check_json=True)
    assert diff.returncode == 1
    assert [c["object"] for c in diff.json["changes"]] == ["JWT role cdc-bridge"]
    assert platform.run("vault", "apply").returncode == 0
    assert platform.run("vault", "diff").returncode == 0


def test_client_secret_is_never_printed(platform):
    secret = root(platform).secrets.kv.v2.read_secret_version(
        path=f"{NAMES.vault.clients_path}/{NAMES.keycloak.client}", mount_point=NAMES.vault.kv_mount,
        raise_on_deleted_version=True)["data"]["data"]["client_secret"]
    for args in (["keycloak", "apply"], ["keycloak", "diff", "-o", "json"], ["token", "--decode"],
                 ["install", "--skip", "services"], ["vault", "status"]):
        result = platform.run(*args)
        assert secret not in result.stdout + result.stderr, args


def test_postman_environment_is_private_and_merged(platform):
    env = platform.path / "postman.env.json"
    assert platform.run("token", "--postman-env", str(env)).returncode == 0
    assert oct(env.stat().st_mode & 0o777) == "0o600"
    data = json.loads(env.read_text())
    data["values"].append({"key": "order_id", "value": "42", "type": "default", "enabled": True})
    env.write_text(json.dumps(data))
    assert platform.run("token", "--postman-env", str(env)).returncode == 0
    values = {v["key"]: v for v in json.loads(env.read_text())["values"]}
    assert values["order_id"]["value"] == "42"
    assert values["client_secret"]["type"] == "secret" and values["access_token"]["value"]
    assert values["token_url"]["value"].endswith("/protocol/openid-connect/token")


def test_unknown_client_is_a_usage_error(platform):
    result = platform.run("token", "--client", "nobody")
    assert result.returncode == 2 and "no client 'nobody'" in result.stderr


def test_init_on_initialised_vault_is_refused(platform):
    result = platform.run("vault", "init")
    assert result.returncode == 1 and "already initialised" in result.stderr


def test_sealed_vault_wrong_share_is_reported_and_right_shares_unseal(platform):
    root(platform).sys.seal()
    status = platform.run("vault", "status", "-o", "json", check_json=True)
    assert status.returncode == 3 and status.json["sealed"] is True

    shares = json.loads((platform.path / ".opsctl" / "vault-init.json").read_text())["keys_base64"]
    wrong = base64.b64encode(os.urandom(33)).decode()
    bad = platform.run("vault", "unseal", "--from", "stdin", stdin=f"{shares[0]}\n{shares[1]}\n{wrong}\n")
    assert bad.returncode == 1 and "rejected" in bad.stderr
    assert platform.run("vault", "status").returncode == 3  # still sealed, nothing lost
    good = platform.run("vault", "unseal", "--from", "stdin", stdin="\n".join(shares[:3]) + "\n")
    assert good.returncode == 0, good.stderr
    assert platform.run("vault", "status").returncode == 0


def pgp_key(folder, email: str) -> tuple[dict, object]:
    """A fresh GnuPG home in `folder` with an encryption key for `email`: (the environment
    that uses it, the exported public key file)."""
    gnupg = folder / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(gnupg)}
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", email,
                    "rsa2048", "encrypt", "never"], env=env, check=True, capture_output=True)
    public = folder / "key.gpg"
    public.write_bytes(subprocess.run(["gpg", "--export", email], env=env,
                                      check=True, capture_output=True).stdout)
    return env, public


def test_vault_init_with_pgp_keys_encrypts_each_share(tmp_path):
    env, public = pgp_key(tmp_path, "opsctl-test@example.org")

    override = port_override(["vault"])
    override["vault"] = {"auto_init": False}
    work = Workdir(reachable_dir("opsctl-pgp-"), override)
    try:
        first = work.run("install", "--only", "vault")
        assert first.returncode == 1 and "not initialised" in first.stderr
        init = work.run("vault", "init", "--key-shares", "2", "--key-threshold", "2",
                        "--pgp-key", str(public), "--pgp-key", str(public))
        assert init.returncode == 0, init.stderr
        record = json.loads((work.path / ".opsctl" / "vault-init.json").read_text())
        assert record["pgp_encrypted"] and len(record["keys_base64"]) == 2
        refused = work.run("vault", "unseal")  # the file's shares are encrypted
        assert refused.returncode == 2 and "PGP-encrypted" in refused.stderr
        plain = [subprocess.run(["gpg", "--batch", "--decrypt"], input=base64.b64decode(k), env=env,
                                check=True, capture_output=True).stdout.decode().strip()
                 for k in record["keys_base64"]]
        # The root token is encrypted too (to the first key): no plain secret is kept.
        assert record["root_token_pgp_encrypted"] and not record["root_token"].startswith("s.")
        init_root = subprocess.run(["gpg", "--batch", "--decrypt"], input=base64.b64decode(record["root_token"]),
                                   env=env, check=True, capture_output=True).stdout.decode().strip()
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True)
        unsealed = work.run("vault", "unseal", "--from", "stdin", stdin="\n".join(plain) + "\n")
        assert unsealed.returncode == 0, unsealed.stderr
        assert "admin token created, root token revoked" in unsealed.stderr
        # opsctl made its admin token from the shares given; the init's root token is revoked.
        admin = json.loads((work.path / ".opsctl" / "vault-admin.json").read_text())["token"]
        client = hvac.Client(url=f"http://127.0.0.1:{work.port('vault', 'http')}", token=admin)
        assert client.auth.token.lookup_self()["data"]["policies"] == ["opsctl-admin"]
        with pytest.raises(hvac.exceptions.Forbidden):
            hvac.Client(url=client.url, token=init_root).auth.token.lookup_self()
        assert "root_token" not in json.loads((work.path / ".opsctl" / "vault-init.json").read_text())
        code, steps = work.steps("--only", "vault")
        assert code == 0 and steps["vault"]["state"] == "unchanged"
    finally:
        work.remove()


def test_validate_jwt_accepts_real_keycloak_tokens_and_checks_the_role(platform):
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from order_services.auth import JWTValidator, add_auth_error_handler, require_token

    issuer = f"{keycloak_url(platform)}/realms/{platform.names.realm}"
    validator = JWTValidator(issuer=issuer, audience=NAMES.keycloak.order_api_audience,
                             required_role=NAMES.keycloak.client_role, client=NAMES.keycloak.client)
    app = FastAPI()
    add_auth_error_handler(app)

    @app.post("/orders")
    def create(claims: dict = Depends(require_token(validator))):
        return {"azp": claims["azp"]}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    client = TestClient(app)
    people = token(platform)["access_token"]
    ok = client.post("/orders", headers={"Authorization": f"Bearer {people}"})
    assert ok.status_code == 200 and ok.json() == {"azp": NAMES.keycloak.client}
    # A service token of the same realm lacks the order API audience: rejected.
    service = token(platform, "--client", "order-creator")["access_token"]
    denied = client.post("/orders", headers={"Authorization": f"Bearer {service}"})
    assert denied.status_code == 401 and "invalid_token" in denied.headers["WWW-Authenticate"]
    # With the audience right but the role missing: 403.
    vault_validator = JWTValidator(issuer=issuer, audience="vault", client="order-creator",
                                   required_role=NAMES.keycloak.client_role)
    from order_services.auth import AuthError

    with pytest.raises(AuthError) as info:
        vault_validator.validate(service)
    assert info.value.status_code == 403
    assert client.post("/orders").status_code == 401
    assert client.get("/health").status_code == 200


def test_service_secrets_helper_logs_in_reads_and_logs_in_again(platform):
    from order_services.secrets import KeycloakToken, VaultSecrets

    stored = root(platform).secrets.kv.v2.read_secret_version(
        path="keycloak/clients/stock-service", mount_point=NAMES.vault.kv_mount,
        raise_on_deleted_version=True)["data"]["data"]
    now = [0.0]
    helper = VaultSecrets(
        f"http://127.0.0.1:{platform.port('vault', 'http')}", "stock-service",
        KeycloakToken(f"{keycloak_url(platform)}/realms/{platform.names.realm}/protocol/openid-connect/token",
                      "stock-service", stored["client_secret"]),
        "stock-service", clock=lambda: now[0])
    assert "postgres_password" in helper.read() and helper.logins == 1
    helper.read()
    assert helper.logins == 1  # the Vault token is reused while valid
    now[0] += 300  # past the token's lifetime (less the renewal margin)
    helper.read()
    assert helper.logins == 2
    helper.client.auth.token.revoke_self()  # refused early: one fresh login
    assert "postgres_username" in helper.read() and helper.logins == 3
