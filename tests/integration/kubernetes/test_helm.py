"""helm, as the kubernetes target runs it, on the real control plane: a release installs
and waits for its Deployment, an upgrade makes a new revision, an upgrade the API server
refuses is rolled back and the release keeps serving the last good revision."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.integration

CHART = {
    "Chart.yaml": "apiVersion: v2\nname: demo\nversion: 0.1.0\n",
    "values.yaml": "replicas: 1\n",
    "templates/deployment.yaml": """apiVersion: apps/v1
kind: Deployment
metadata: {name: demo}
spec:
  replicas: {{ .Values.replicas }}
  selector: {matchLabels: {app: demo}}
  template:
    metadata: {labels: {app: demo}}
    spec: {containers: [{name: demo, image: "nginx:1.27"}]}
""",
}


@pytest.fixture
def chart(tmp_path):
    for name, text in CHART.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def helm(control_plane, *args: str) -> subprocess.CompletedProcess:
    from tests.integration.controlplane import helm as binary

    return subprocess.run([str(binary()), "--kubeconfig", str(control_plane.kubeconfig), *args],
                          capture_output=True, text=True, timeout=180)


def test_install_upgrade_and_a_refused_upgrade_rolled_back(control_plane, namespace, chart):
    from kubernetes import client

    apps = client.AppsV1Api(control_plane.api())
    common = ["-n", namespace, "--wait", "--timeout", "90s"]
    first = helm(control_plane, "upgrade", "--install", "demo", str(chart), *common)
    assert first.returncode == 0, first.stderr
    assert apps.read_namespaced_deployment("demo", namespace).status.available_replicas == 1

    second = helm(control_plane, "upgrade", "demo", str(chart), "--set", "replicas=3", *common)
    assert second.returncode == 0, second.stderr
    assert apps.read_namespaced_deployment("demo", namespace).status.available_replicas == 3

    refused = helm(control_plane, "upgrade", "demo", str(chart), "--set", "replicas=-1", "--rollback-on-failure",
                   *common)
    assert refused.returncode != 0
    assert "replicas" in refused.stderr  # the API server's validation, passed on
    history = json.loads(helm(control_plane, "history", "demo", "-n", namespace, "-o", "json").stdout)
    assert history[-1]["status"] == "deployed" and history[-1]["revision"] > 2
    assert apps.read_namespaced_deployment("demo", namespace).spec.replicas == 3
