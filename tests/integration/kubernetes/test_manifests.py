"""Every manifest opsctl would apply, rendered by helm with the values opsctl computes from
platform.yaml and sent to the control plane's API server as a server-side dry run: its
schemas, admission and RBAC rules accept them all. Nothing is stored."""

from __future__ import annotations

import json
import subprocess

import pytest

from opsctl import spec
from opsctl.components import Skipped, infrastructure
from opsctl.components.metallb import AddressPool
from opsctl.components.service_releases import releases
from opsctl.context import Context
from opsctl.errors import OpsError
from tests.integration.controlplane import helm

pytestmark = pytest.mark.integration

UNFETCHABLE = {"consul", "prometheus-grafana", "airflow"}  # their charts cannot be had on this machine


def test_every_release_opsctl_applies_passes_a_server_side_dry_run(control_plane, tmp_path):
    from kubernetes import client

    platform = spec.load(None)  # in namespaces of its own, deleted after it (the other tests expect none)
    namespaces = {f"dry-run-{n}": members for n, members in platform.kubernetes.namespaces.items()}
    platform = platform.model_copy(update={"kubernetes": platform.kubernetes.model_copy(update={"namespaces": namespaces})})
    ctx = Context(platform, "kubernetes", tmp_path / ".opsctl", False, {"kubeconfig": str(control_plane.kubeconfig)})
    runtime = ctx.runtime
    servers = [s for c in infrastructure(ctx) if not isinstance(c, Skipped) for s in c.servers()
               if not isinstance(s, AddressPool)]  # rendered only once MetalLB's CRDs exist (a kind cluster)
    servers += releases(ctx) + releases(ctx, "green")
    core, checked, unfetchable = client.CoreV1Api(control_plane.api()), [], set()
    try:
        for server in servers:
            try:
                name, namespace, chart, values = runtime.rendering(server)
            except OpsError as e:
                assert "cannot be fetched" in e.message, e.message
                unfetchable.add(server.name)
                continue
            if namespace not in {n.metadata.name for n in core.list_namespace().items}:
                core.create_namespace({"metadata": {"name": namespace}})  # a dry run needs its namespace
            values_file = tmp_path / f"{name}.json"
            values_file.write_text(json.dumps(values))
            done = subprocess.run([str(helm()), "--kubeconfig", str(control_plane.kubeconfig), "upgrade", "--install",
                                   name, str(chart), "-n", namespace, "-f", str(values_file), "--dry-run=server"],
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{name}: {done.stderr}"
            # what helm sent (the mesh's entries are Consul CRs: only where Consul's CRDs are)
            assert ("kind:" in done.stdout) != (name == "mesh-config"), done.stdout
            checked.append(name)
    finally:
        for namespace in set(namespaces) & {n.metadata.name for n in core.list_namespace().items}:
            core.delete_namespace(namespace)
    assert unfetchable == UNFETCHABLE
    assert {"nginx", "metallb", "cert-manager", "redis", "keycloak", "spark", "mesh-config", "order-creator"} <= set(checked)
    assert not [d for d in client.AppsV1Api(control_plane.api()).list_deployment_for_all_namespaces().items
                if d.metadata.namespace.startswith("dry-run-")]  # nothing was created
