"""Hardening on the real local platform: private files, no secrets in logs, MongoDB and
RabbitMQ users limited to what each service does, Vault without a standing root token,
the Spark driver on loopback."""

import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import hvac
import pytest

from opsctl import httpclient
from tests.integration.conftest import NAMES, workdir_context
from tests.integration.test_identity import pgp_key

pytestmark = pytest.mark.integration


def state(platform) -> Path:
    return platform.path / ".opsctl"


def admin_token(platform) -> str:
    return json.loads((state(platform) / "vault-admin.json").read_text())["token"]


def vault(platform, token: str | None = None) -> hvac.Client:
    return hvac.Client(url=f"http://127.0.0.1:{platform.port('vault', 'http')}",
                       token=admin_token(platform) if token is None else token)


def kv(platform, path: str) -> dict:
    return vault(platform).secrets.kv.v2.read_secret_version(
        path=path, mount_point=NAMES.vault.kv_mount, raise_on_deleted_version=True)["data"]["data"]


def root_accessors(platform) -> list[str]:
    client = vault(platform)
    found = []
    for accessor in client.list("auth/token/accessors")["data"]["keys"]:
        info = client.write_data("auth/token/lookup-accessor", data={"accessor": accessor})["data"]
        if "root" in info["policies"]:
            found.append(accessor)
    return found


def token_valid(platform, token: str) -> bool:
    try:
        vault(platform, token).auth.token.lookup_self()
        return True
    except hvac.exceptions.Forbidden:
        return False


def test_the_hardened_platform_installs(platform):
    code, steps = platform.first_install
    assert code == 0, {n: s for n, s in steps.items() if s["state"] == "failed"}


@pytest.fixture(scope="module")
def running(platform):
    """The platform with its services running, so that their logs and state exist too."""
    assert platform.run("queues", "apply").returncode == 0
    started = platform.run("services", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    yield platform
    platform.run("services", "stop")


# --- files -------------------------------------------------------------------------------
def _open_to_others(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            path = Path(folder) / name if name != "." else Path(folder)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue  # a link's own mode means nothing; its target is walked or outside
            if st.st_mode & 0o077:
                found.append(f"{path} {stat.filemode(st.st_mode)}")
    return found


def test_everything_under_the_state_folder_is_its_owners_only(running):
    """Every folder, file and socket: logs, each server's data, secrets, vault-init, state."""
    root = state(running)
    seen = {p.name for p in root.iterdir()}
    assert {"secrets.json", "vault-init.json", "vault-admin.json", "state.json", "local"} <= seen, seen
    servers = {p.name for p in (root / "local").iterdir()}
    assert {"rabbitmq", "mongodb", "vault", "redis", "kafka", "keycloak", "regular-consumer"} <= servers
    assert (root / "local" / "redis" / "users.acl").exists()
    offenders = _open_to_others(root)
    assert not offenders, "readable or writable by group/others:\n" + "\n".join(offenders)


def test_postgres_data_outside_the_state_folder_is_its_users_only(running):
    from opsctl.components.postgres import Postgres

    data = Postgres("postgres", workdir_context(running)).data
    if data.is_relative_to(state(running)):
        pytest.skip("PostgreSQL keeps its data in the state folder here (checked with it)")
    st = data.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    import pwd

    assert pwd.getpwuid(st.st_uid).pw_name == "postgres"
    offenders = [o for o in _open_to_others(data)]
    assert not offenders, "\n".join(offenders)


def _generated_secrets(platform) -> dict[str, str]:
    """Every secret the platform generated: admin passwords, unseal shares, the admin token,
    the client secrets, the services' store passwords, the realm's signing key."""
    found = {}
    for component, values in json.loads((state(platform) / "secrets.json").read_text()).items():
        found.update({f"secrets.json {component}.{k}": v for k, v in values.items()})
    record = json.loads((state(platform) / "vault-init.json").read_text())
    for i, key in enumerate(record["keys_base64"]):
        found[f"unseal share {i}"] = key
        found[f"unseal share {i} (hex)"] = record["keys"][i]
    found["vault admin token"] = admin_token(platform)
    client = vault(platform)
    for client_id in client.secrets.kv.v2.list_secrets(path=NAMES.vault.clients_path, mount_point=NAMES.vault.kv_mount)["data"]["keys"]:
        found[f"client secret {client_id}"] = kv(platform, f"{NAMES.vault.clients_path}/{client_id}")["client_secret"]
    for service in service_names(platform):
        for key, value in kv(platform, service).items():
            if key.endswith("_password"):
                found[f"{service} {key}"] = value
    key = kv(platform, "keycloak/signing-key")
    found["signing key"] = key["private_key"].strip().splitlines()[1]
    return {what: value for what, value in found.items() if value and len(value) >= 8}


def service_names(platform) -> list[str]:
    import yaml

    from opsctl import spec

    return list(yaml.safe_load(spec.DEFAULT_SPEC.read_text())["services"])


def test_no_log_holds_a_generated_secret(running):
    secrets = _generated_secrets(running)
    assert len(secrets) > 20, sorted(secrets)
    logs = [p for p in state(running).rglob("*")
            if p.is_file() and ("logs" in p.relative_to(state(running)).parts or p.suffix == ".log")]
    names = {p.name for p in logs}
    assert {"regular-consumer.log", "vault.log", "mongodb.log", "keycloak.log"} <= names, names
    leaks = [f"{log}: {what}" for log in logs for what, value in secrets.items()
             if value in log.read_text(errors="replace")]
    assert not leaks, "secrets in logs:\n" + "\n".join(leaks)


# --- MongoDB -----------------------------------------------------------------------------
def _mongo(platform, **auth):
    from pymongo import MongoClient

    return MongoClient(f"mongodb://127.0.0.1:{platform.port('mongodb', 'mongo')}/?replicaSet={NAMES.mongodb.replica_set}",
                       serverSelectionTimeoutMS=5000, **auth)


def test_mongodb_refuses_an_unauthenticated_client_and_each_service_may_only_do_its_part(platform):
    from pymongo.errors import OperationFailure

    with _mongo(platform) as anonymous:
        for action in (lambda: anonymous[NAMES.mongodb.database][NAMES.mongodb.orders].find_one(),
                       lambda: anonymous[NAMES.mongodb.database][NAMES.mongodb.orders].insert_one({"_id": "anonymous"}),
                       lambda: anonymous.admin.command("listDatabases")):
            with pytest.raises(OperationFailure) as info:
                action()
            assert info.value.code == 13  # Unauthorized
    with _mongo(platform, username="opsctl-admin", authSource="admin",
                password=platform.admin_secret("mongodb", "admin_password")) as admin:
        assert NAMES.mongodb.database in admin.list_database_names() or admin[NAMES.mongodb.database].command("ping")

    consumer = kv(platform, "regular-consumer")
    with _mongo(platform, username=consumer["mongodb_username"], password=consumer["mongodb_password"],
                authSource=NAMES.mongodb.database) as client:
        orders = client[NAMES.mongodb.database][NAMES.mongodb.orders]
        orders.update_one({"_id": "hardening-probe"}, {"$set": {"ok": 1}}, upsert=True)
        assert orders.find_one({"_id": "hardening-probe"})["ok"] == 1
        for action in (lambda: orders.delete_one({"_id": "hardening-probe"}), lambda: orders.drop(),
                       lambda: orders.create_index("ok"), lambda: client.admin.command("listDatabases"),
                       lambda: client.other.things.insert_one({}),
                       lambda: client[NAMES.mongodb.database].command("createUser", "intruder", pwd="x" * 12, roles=[])):
            with pytest.raises(OperationFailure) as info:
                action()
            assert info.value.code == 13
    bridge = kv(platform, "cdc-bridge")
    with _mongo(platform, username=bridge["mongodb_username"], password=bridge["mongodb_password"],
                authSource=NAMES.mongodb.database) as client:
        assert client[NAMES.mongodb.database][NAMES.mongodb.orders].find_one({"_id": "hardening-probe"})
        with pytest.raises(OperationFailure):
            client[NAMES.mongodb.database][NAMES.mongodb.orders].insert_one({"_id": "from-the-bridge"})
    with pytest.raises(OperationFailure):  # one service's password is not another's
        with _mongo(platform, username=bridge["mongodb_username"], password=consumer["mongodb_password"],
                    authSource=NAMES.mongodb.database) as client:
            client[NAMES.mongodb.database].command("ping")
    with _mongo(platform, username="opsctl-admin", authSource="admin",
                password=platform.admin_secret("mongodb", "admin_password")) as admin:
        admin[NAMES.mongodb.database][NAMES.mongodb.orders].delete_one({"_id": "hardening-probe"})  # the platform is shared


# --- RabbitMQ ----------------------------------------------------------------------------
def _amqp(platform, service: str):
    import pika

    creds = kv(platform, service)
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        host="127.0.0.1", port=platform.port("rabbitmq", "amqp"),
        credentials=pika.PlainCredentials(creds["rabbitmq_username"], creds["rabbitmq_password"])))
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def _refused(platform, service: str, action) -> int:
    """Run action(channel) as the service; the code the broker closed the channel with."""
    import pika.exceptions

    connection, channel = _amqp(platform, service)
    try:
        action(channel)
        return 0
    except pika.exceptions.ChannelClosedByBroker as e:
        return e.reply_code
    finally:
        if connection.is_open:
            connection.close()


def test_a_consumers_user_cannot_publish_orders_or_delete_a_queue(platform):
    assert platform.run("queues", "apply").returncode == 0
    body = b'{"probe": true}'
    consumer = "regular-consumer"
    assert _refused(platform, consumer, lambda ch: ch.basic_publish(NAMES.exchanges.orders, "priority", body)) == 403
    assert _refused(platform, consumer, lambda ch: ch.queue_delete(NAMES.queues.regular)) == 403
    assert _refused(platform, consumer, lambda ch: ch.queue_delete(NAMES.queues.priority)) == 403
    assert _refused(platform, consumer, lambda ch: ch.queue_declare("its-own-queue")) == 403
    assert _refused(platform, consumer, lambda ch: ch.basic_get(NAMES.queues.priority)) == 403
    # What it does: passive declares, consume its queue, a retry copy, dead letters.
    assert _refused(platform, consumer, lambda ch: (
        ch.queue_declare(NAMES.queues.regular, passive=True), ch.exchange_declare(NAMES.exchanges.orders, passive=True),
        ch.basic_get(NAMES.queues.regular), ch.basic_publish(NAMES.exchanges.dead_letter, "", body))) == 0
    creator = "order-creator"
    assert _refused(platform, creator, lambda ch: ch.exchange_declare(NAMES.exchanges.orders, passive=True)) == 0
    assert _refused(platform, creator, lambda ch: ch.basic_get(NAMES.queues.regular)) == 403
    assert _refused(platform, creator, lambda ch: ch.basic_publish(NAMES.exchanges.dead_letter, "", body)) == 403
    assert _refused(platform, creator, lambda ch: ch.exchange_delete(NAMES.exchanges.orders)) == 403
    assert _refused(platform, "order-screening", lambda ch: ch.basic_get(NAMES.queues.validation)) == 403
    management = f"http://127.0.0.1:{platform.port('rabbitmq', 'management')}/api"
    admin = ("opsctl-admin", platform.admin_secret("rabbitmq", "admin_password"))
    httpclient.request("DELETE", f"{management}/queues/%2F/{NAMES.queues.dead_letter}/contents", auth=admin)
    # A second install finds every permission as it wants it.
    code, steps = platform.steps("--only", "service-credentials")
    assert code == 0 and steps["service-credentials"]["state"] == "unchanged", steps


# --- Vault -------------------------------------------------------------------------------
def test_opsctl_works_with_its_admin_token_and_no_root_token_is_left(platform):
    admin_file = state(platform) / "vault-admin.json"
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600
    record = json.loads((state(platform) / "vault-init.json").read_text())
    assert "root_token" not in record and record["root_token_revoked"] is True
    info = vault(platform).auth.token.lookup_self()["data"]
    assert info["policies"] == ["opsctl-admin"] and info["period"] == 720 * 3600
    assert info["orphan"] is True and 0 < info["ttl"] <= 720 * 3600
    assert root_accessors(platform) == []
    assert platform.run("vault", "diff").returncode == 0
    code, steps = platform.steps("--only", "vault")
    assert code == 0 and steps["vault"]["state"] == "unchanged", steps


def test_an_expired_admin_token_is_made_again_from_the_shares(platform):
    old = admin_token(platform)
    vault(platform).auth.token.revoke_self()  # as good as expired
    diff = platform.run("vault", "diff")
    assert diff.returncode == 0, diff.stdout + diff.stderr
    new = admin_token(platform)
    assert new != old and not token_valid(platform, old) and token_valid(platform, new)
    assert root_accessors(platform) == []  # the one generate-root made is revoked too


def test_root_token_is_generated_only_when_asked(platform, tmp_path):
    refused = platform.run("vault", "root-token")
    assert refused.returncode == 2 and "--generate" in refused.stderr
    made = platform.run("vault", "root-token", "--generate", "-o", "json", check_json=True)
    assert made.returncode == 0, made.stderr
    token = made.json["root_token"]
    assert vault(platform, token).auth.token.lookup_self()["data"]["policies"] == ["root"]
    vault(platform, token).auth.token.revoke_self()

    env, public = pgp_key(tmp_path, "root@example.org")
    shares = json.loads((state(platform) / "vault-init.json").read_text())["keys_base64"][:3]
    made = platform.run("vault", "root-token", "--generate", "--from", "stdin", "--pgp-key", str(public),
                        "-o", "json", check_json=True, stdin="\n".join(shares) + "\n")
    assert made.returncode == 0 and made.json["pgp_encrypted"], made.stderr
    plain = subprocess.run(["gpg", "--batch", "--decrypt"], input=base64.b64decode(made.json["root_token"]),
                           env=env, check=True, capture_output=True).stdout.decode().strip()
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True)
    assert plain != made.json["root_token"] and token_valid(platform, plain)
    vault(platform, plain).auth.token.revoke_self()
    wrong = platform.run("vault", "root-token", "--generate", "--from", "stdin",
                         stdin=base64.b64encode(os.urandom(33)).decode() + "\n")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert root_accessors(platform) == []
