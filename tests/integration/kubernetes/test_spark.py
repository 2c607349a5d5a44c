"""The streaming job on the kubernetes target: step spark gives its driver a ServiceAccount
that may run executors in the jobs namespace (and nothing else) and a checkpoint volume;
`jobs stream start --target kubernetes` submits it for real with spark-submit in cluster
mode to the control plane's API server, the model alongside as a Secret. kwok plays the
driver's pod (no container runs), so what is checked is what Spark asked the cluster for."""

from __future__ import annotations

import base64
import importlib.metadata

import pytest

from tests.integration.kubernetes.conftest import kube

pytestmark = pytest.mark.integration


def test_the_stream_is_submitted_to_the_cluster_with_its_model_alongside(control_plane, work):
    from kubernetes import client

    api = control_plane.api()
    core = client.CoreV1Api(api)
    namespace, job = work.spec.kubernetes.namespace("spark"), work.spec.stream_job
    stream = ("jobs", "stream")

    not_yet = work.run(*stream, "start", *kube(control_plane))
    assert not_yet.returncode == 2 and "step spark is not installed" in not_yet.stderr, not_yet.stderr
    installed = work.run("install", *kube(control_plane, "--only", "spark", "-o", "json"), check_json=True)
    assert installed.returncode == 0 and installed.json["steps"][0]["state"] == "changed", installed.stdout

    def may(verb: str, resource: str, where: str = namespace) -> bool:
        review = client.AuthorizationV1Api(api).create_subject_access_review({"spec": {
            "user": f"system:serviceaccount:{namespace}:spark-driver",
            "resourceAttributes": {"namespace": where, "verb": verb, "resource": resource}}})
        return review.status.allowed

    assert may("create", "pods") and may("delete", "pods") and may("create", "configmaps")
    assert not may("get", "secrets") and not may("create", "pods", "default")
    assert core.read_namespaced_persistent_volume_claim("spark-checkpoint", namespace)

    untrained = work.run(*stream, "start", *kube(control_plane))
    assert untrained.returncode == 2 and "train one first" in untrained.stderr
    work.run("orders", "generate", "--count", "2000", "--out", "orders.jsonl")
    trained = work.run("jobs", "train-vae", "--from", "orders.jsonl", "--epochs", "2")
    assert trained.returncode == 0, trained.stderr
    wrong = work.run(*stream, "start", *kube(control_plane, "--master", "spark://127.0.0.1:7077"))
    assert wrong.returncode == 2 and "k8s://" in wrong.stderr
    taken = work.run(*stream, "start", *kube(control_plane, "--conf", "spark.kubernetes.driver.pod.name=other"))
    assert taken.returncode == 2 and "set by opsctl" in taken.stderr, taken.stderr

    started = work.run(*stream, "start", *kube(control_plane, "--conf", "spark.executor.instances=2", "-o", "json"),
                       check_json=True)
    assert started.returncode == 0, started.stdout + started.stderr
    assert started.json["master"] == f"k8s://{api.configuration.host}"
    driver = core.read_namespaced_pod(f"{job}-driver", namespace)
    spec, container = driver.spec, driver.spec.containers[0]
    assert spec.service_account_name == "spark-driver" and container.args[0] == "driver"
    assert container.image == f"{work.spec.kubernetes.services_image}:{importlib.metadata.version('order-services')}"
    assert driver.metadata.labels["app.kubernetes.io/name"] == job  # what the stores' NetworkPolicies admit
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    volumes = {v.name: v for v in spec.volumes}
    assert volumes[mounts["/models/vae"]].secret.secret_name == f"{job}-model"
    assert volumes[mounts["/var/lib/order-service"]].persistent_volume_claim.claim_name == "spark-checkpoint"
    env = {e.name: e for e in container.env}
    assert env["OIDC_CLIENT_SECRET"].value_from.secret_key_ref.name == "spark-credentials"
    assert env["KAFKA_BOOTSTRAP"].value.startswith(f"kafka.{work.spec.kubernetes.namespace('kafka')}.svc")
    model = core.read_namespaced_secret(f"{job}-model", namespace).data
    assert base64.b64decode(model["model.json"]) == (work.path / ".opsctl/models/vae/model.json").read_bytes()
    properties = core.read_namespaced_config_map(
        next(v.config_map.name for v in spec.volumes if v.config_map), namespace).data["spark.properties"]
    assert "spark.executor.instances=2" in properties

    status = work.run(*stream, "status", *kube(control_plane, "-o", "json"), check_json=True)
    assert status.returncode == 0 and status.json["health"] == "healthy", status.stdout
    again = work.run(*stream, "start", *kube(control_plane, "-o", "json"), check_json=True)
    assert again.returncode == 0 and "replaced driver pod" in again.json["detail"]

    printed = work.run(*stream, "submit-command", *kube(control_plane, "-o", "json"), check_json=True)
    argv = printed.json["argv"]
    assert argv[argv.index("--deploy-mode") + 1] == "cluster" and argv[-1].startswith("local:///")
    assert printed.json["env"] == {"KUBECONFIG": str(control_plane.kubeconfig)}
    secret = base64.b64decode(core.read_namespaced_secret("spark-credentials", namespace).data["client-secret"]).decode()
    assert secret not in printed.stdout

    stopped = work.run(*stream, "stop", *kube(control_plane, "-o", "json"), check_json=True)
    assert stopped.json["stopped"] is True
    after = work.run(*stream, "status", *kube(control_plane, "-o", "json"), check_json=True)
    assert after.returncode == 3 and after.json["health"] == "unhealthy"

    work.run(*stream, "start", *kube(control_plane))  # down stops a running job with its release
    down = work.run("down", *kube(control_plane, "-o", "json"), check_json=True)
    assert "spark" in down.json["stopped"]
    assert not core.list_namespaced_pod(namespace, label_selector="spark-role=driver").items
