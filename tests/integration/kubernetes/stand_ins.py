"""Real servers on this machine that play servers' pods on the test control plane, for what
opsctl does in a pod through a port-forward (install's configuration steps, Vault's unseal):
kwok serves the nodes' kubelet API, and a PortForward object of kwok's sends a pod's ports to
a server here. Used by the tests (conftest's fixtures) and the benchmarks of the target."""

from __future__ import annotations

import contextlib
import shutil

from tests.integration.conftest import Workdir, port_override, reachable_dir

# The servers whose pods opsctl talks to (a whole install's), and opsctl's names of their
# admin passwords (a release's Secret holds it as `password`).
SERVERS = ("vault", "keycloak", "postgres", "redis", "mongodb", "rabbitmq")
ADMIN_PASSWORDS = {"keycloak": "admin_password", "postgres": "password", "redis": "password",
                   "mongodb": "admin_password", "rabbitmq": "admin_password"}
KWOK = ("kwok.x-k8s.io", "v1alpha1")


def play(api, namespace: str, pod: str, ports: dict[int, int]) -> None:
    """Port p of pod `pod` is, for a port-forward, port ports[p] on this machine."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
    except ApiException as e:
        assert e.status == 409
    client.CustomObjectsApi(api).create_namespaced_custom_object(*KWOK, namespace, "portforwards", {
        "apiVersion": "/".join(KWOK), "kind": "PortForward", "metadata": {"name": pod, "namespace": namespace},
        "spec": {"forwards": [{"ports": [inside], "target": {"port": outside, "address": "127.0.0.1"}}
                              for inside, outside in ports.items()]}})


def unplay(api, namespace: str, pod: str) -> None:
    from kubernetes import client

    client.CustomObjectsApi(api).delete_namespaced_custom_object(*KWOK, namespace, "portforwards", pod)


def start(api, work: Workdir, servers=SERVERS) -> tuple[Workdir, list[tuple[str, str]]]:
    """Real servers (the local target's, installed and configured as opsctl does here) that
    play `servers`' pods for `work`'s platform on the cluster, each admin password in its
    release's Secret (which the release keeps), and with Vault its admin token as `work`'s
    operator holds it. Returns their working directory and the pods played."""
    from kubernetes import client

    local = Workdir(reachable_dir("opsctl-kube-stand-ins-"), port_override(list(servers)))
    code, steps = local.steps("--only", ",".join(servers))
    assert code == 0, steps
    core, played = client.CoreV1Api(api), []
    for server in servers:
        namespace = work.spec.kubernetes.namespace(server)
        play(api, namespace, f"{server}-0", {
            port: local.port(server, key) for key, port in work.spec.components[server].ports.items()})
        played.append((namespace, f"{server}-0"))
        if server in ADMIN_PASSWORDS:
            core.create_namespaced_secret(namespace, {"metadata": {"name": f"{server}-credentials"}, "stringData": {
                "password": local.admin_secret(server, ADMIN_PASSWORDS[server])}})
    if "vault" in servers:
        kept = work.path / ".opsctl" / "kubernetes" / "opsctl-test"
        kept.mkdir(parents=True, mode=0o700, exist_ok=True)
        shutil.copy(local.path / ".opsctl" / "vault-admin.json", kept / "vault-admin.json")
    return local, played


@contextlib.contextmanager
def standing_in(api, work: Workdir, servers=SERVERS):
    """start(), then stop them and delete their PortForward objects."""
    local, played = start(api, work, servers)
    try:
        yield local
    finally:
        for namespace, pod in played:
            unplay(api, namespace, pod)
        local.remove()
