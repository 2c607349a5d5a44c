"""Fixtures of the kubernetes target's tests: a control plane, a namespace per test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.integration.conftest import LIVE_WORKDIRS, Workdir, reachable_dir


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
    this machine (stand_ins.play). The PortForward objects go after the test."""
    from tests.integration.kubernetes import stand_ins

    api, played = control_plane.api(), []

    def play(namespace: str, pod: str, ports: dict[int, int]) -> None:
        stand_ins.play(api, namespace, pod, ports)
        played.append((namespace, pod))

    yield play
    for namespace, pod in played:
        stand_ins.unplay(api, namespace, pod)


@pytest.fixture
def stand_ins(control_plane):
    """stand_ins(work, *servers): real servers on this machine playing those servers' pods
    (stand_ins.start); stopped, and their PortForward objects deleted, after the test."""
    import contextlib

    from tests.integration.kubernetes.stand_ins import standing_in

    with contextlib.ExitStack() as stack:
        yield lambda work, *servers: stack.enter_context(standing_in(control_plane.api(), work, servers))
