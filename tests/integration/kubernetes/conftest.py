"""Fixtures of the kubernetes target's tests: a control plane, a namespace per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.integration.conftest import LIVE_WORKDIRS, Workdir, port_override, reachable_dir


@pytest.fixture(scope="package")
def control_plane():
    """A real Kubernetes control plane with 3 kwok nodes (tests/integration/controlplane.py),
    started for the tests of this folder and stopped after them, so that it does not share
    the machine with the local platform's tests."""
    from tests.integration.controlplane import ControlPlane

    cluster = ControlPlane(Path(tempfile.mkdtemp(prefix="opsctl-kube-")))
    LIVE_WORKDIRS.append(cluster)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        LIVE_WORKDIRS.remove(cluster)
        shutil.rmtree(cluster.path, ignore_errors=True)


@pytest.fixture
def namespace(control_plane, request):
    """A namespace of its own for one test, deleted after it."""
    import re

    from kubernetes import client

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{os.getpid() % 1000}"
    core = client.CoreV1Api(control_plane.api())
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def kube(control_plane, *args: str) -> list[str]:
    """opsctl's options for the kubernetes target on this control plane, then ARGS."""
    return ["--target", "kubernetes", "--kubeconfig", str(control_plane.kubeconfig), *args]


@pytest.fixture
def work(control_plane):
    """A working directory for opsctl on the control plane; what it installed there is
    uninstalled and purged after the test."""
    work = Workdir(reachable_dir("opsctl-kube-work-"), {})
    yield work
    work.run("down", *kube(control_plane, "--purge", "--yes"), timeout=300)
    LIVE_WORKDIRS.remove(work)
    shutil.rmtree(work.path, ignore_errors=True)


@pytest.fixture
def play_the_pod(control_plane):
    """play(namespace, pod, ports): port p of the pod is, for a port-forward, port ports[p] on
    this machine (a PortForward object of kwok's). The objects go after the test."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = control_plane.api()
    objects, played = client.CustomObjectsApi(api), []

    def play(namespace: str, pod: str, ports: dict[int, int]) -> None:
        try:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": namespace}})
        except ApiException as e:
            assert e.status == 409
        objects.create_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", namespace, "portforwards", {
            "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "PortForward",
            "metadata": {"name": pod, "namespace": namespace},
            "spec": {"forwards": [{"ports": [inside], "target": {"port": outside, "address": "127.0.0.1"}}
                                  for inside, outside in ports.items()]}})
        played.append((namespace, pod))

    yield play
    for namespace, pod in played:
        objects.delete_namespaced_custom_object("kwok.x-k8s.io", "v1alpha1", namespace, "portforwards", pod)


ADMIN_PASSWORDS = {"keycloak": "admin_password", "postgres": "password", "redis": "password",
                   "mongodb": "admin_password", "rabbitmq": "admin_password"}  # opsctl's names of them


@pytest.fixture
def stand_ins(control_plane, play_the_pod):
    """stand_ins(work, *servers): real servers on this machine (the local target, installed
    and configured as opsctl does there) that play those servers' pods on the cluster, each
    with its admin password in its release's Secret, which the release keeps; with Vault,
    its admin token as the operator of `work` holds it. Returns their working directory."""
    from kubernetes import client

    made = []

    def stand_in(work: Workdir, *servers: str) -> Workdir:
        local = Workdir(reachable_dir("opsctl-kube-stand-ins-"), port_override(list(servers)))
        made.append(local)
        code, steps = local.steps("--only", ",".join(servers))
        assert code == 0, steps
        core = client.CoreV1Api(control_plane.api())
        for server in servers:
            namespace = work.spec.kubernetes.namespace(server)
            play_the_pod(namespace, f"{server}-0", {
                port: local.port(server, key) for key, port in work.spec.components[server].ports.items()})
            if server in ADMIN_PASSWORDS:
                core.create_namespaced_secret(namespace, {"metadata": {"name": f"{server}-credentials"}, "stringData": {
                    "password": local.admin_secret(server, ADMIN_PASSWORDS[server])}})
        if "vault" in servers:
            kept = work.path / ".opsctl" / "kubernetes" / "opsctl-test"
            kept.mkdir(parents=True, mode=0o700, exist_ok=True)
            shutil.copy(local.path / ".opsctl" / "vault-admin.json", kept / "vault-admin.json")
        return local

    yield stand_in
    for local in made:
        local.remove()
