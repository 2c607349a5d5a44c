"""`opsctl bluegreen status|deploy|switch|rollback --target kubernetes` on the real control
plane: a colour gets an image of its own without touching the live one, the Services move to
the other colour only when its Deployments are available, and go back by themselves when the
new colour degrades during the watch."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from tests.integration.controlplane import helm

pytestmark = pytest.mark.integration

NEW_IMAGE = "registry.example.org/order-services:2.0.0"


def eventually(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout:g} s"
        time.sleep(0.2)


def test_deploy_switch_watch_and_rollback_on_the_cluster(control_plane, work):
    from kubernetes import client

    kube = ["--target", "kubernetes", "--kubeconfig", str(control_plane.kubeconfig)]
    api = control_plane.api()
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    namespace = work.spec.kubernetes.namespace("services")
    replicas = work.spec.kubernetes.replicas

    def selected(service: str = "order-creator") -> str:
        return core.read_namespaced_service(service, namespace).spec.selector["opsctl.io/colour"]

    def image(deployment: str) -> str:
        return apps.read_namespaced_deployment(deployment, namespace).spec.template.spec.containers[0].image

    def scale(deployment: str, count: int) -> None:
        apps.patch_namespaced_deployment_scale(deployment, namespace, {"spec": {"replicas": count}})

    def revision(release: str) -> tuple[int, str]:
        shown = json.loads(subprocess.run(
            [str(helm()), "--kubeconfig", str(control_plane.kubeconfig), "status", release, "-n", namespace,
             "-o", "json"], capture_output=True, text=True, check=True).stdout)
        return shown["version"], shown["info"]["status"]

    def bluegreen(*args: str):
        return work.run("bluegreen", *args, *kube, "-o", "json", check_json=True)

    not_yet = bluegreen("deploy", "--image", NEW_IMAGE)
    assert not_yet.returncode == 2 and "install the services first" in not_yet.stdout
    installed = work.run("install", *kube, "--only", "services")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    status = bluegreen("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert (status.json["live"], status.json["edge"]) == ("blue", "blue")
    green = next(c for c in status.json["colours"] if c["colour"] == "green")
    assert green["healthy"] and {s["service"] for s in green["services"]} == {"order-creator-green", "stock-service-green"}
    assert f"{replicas} behind Service order-creator-green" in green["services"][0]["detail"] + green["services"][1]["detail"]
    installed_image = image("order-creator-blue")

    # deploy: hostile or misplaced input changes nothing; the idle colour gets the image
    for bad in ("order-services", "x:1;rm -rf /", "x:1\n--set=a", "UPPER:1"):
        refused = bluegreen("deploy", "--colour", "green", "--image", bad)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert bluegreen("deploy", "--colour", "blue", "--image", NEW_IMAGE).returncode == 2  # live
    assert bluegreen("deploy", "--ref", "HEAD").returncode == 2
    assert image("order-creator-green") == installed_image
    deployed = bluegreen("deploy", "--image", NEW_IMAGE)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert {r["state"] for r in deployed.json["services"]} == {"changed"}
    assert image("order-creator-green") == image("stock-service-green") == NEW_IMAGE
    assert image("order-creator-blue") == installed_image and selected() == "blue"
    again = work.run("install", *kube, "--only", "services", "-o", "json", check_json=True)
    assert again.json["steps"][0]["state"] == "unchanged"  # the deployed image is kept
    assert image("order-creator-green") == NEW_IMAGE

    # a gate that fails changes nothing
    scale("order-creator-green", 0)
    refused = bluegreen("switch", "--yes", "--analysis-seconds", "1")
    assert refused.returncode == 1 and refused.json["failed"] == "health", refused.stdout
    assert "order-creator-green 0/0" in refused.json["checks"][0]["detail"]
    assert selected() == "blue" and bluegreen("status").json["live"] == "blue"
    scale("order-creator-green", replicas)
    eventually(lambda: (apps.read_namespaced_deployment("order-creator-green", namespace)
                                    .status.available_replicas or 0) == replicas, "green available again")

    # the switch: every Service on green, the workers on green's image, a helm revision each
    switched = bluegreen("switch", "--yes", "--analysis-seconds", "2")
    assert switched.returncode == 0, switched.stdout + switched.stderr
    assert switched.json["switched"] and not switched.json["rolled_back"]
    assert [c["check"] for c in switched.json["checks"]] == ["health", "post-switch watch"]
    assert selected("order-creator") == selected("stock-service") == "green"
    assert image("regular-consumer") == NEW_IMAGE
    assert revision("order-creator")[1] == "deployed"
    status = bluegreen("status")
    assert status.returncode == 0 and (status.json["live"], status.json["edge"]) == ("green", "green")
    assert status.json["history"][0]["previous"] == "blue"

    # blue degrades during the watch of a switch to it: the Services go back to green by themselves
    before = revision("order-creator")[0]

    def degrade_once_blue_is_live():  # once helm has applied order-creator's Deployments (it sets replicas)
        deadline = time.monotonic() + 60
        while revision("order-creator") != (before + 1, "deployed") and time.monotonic() < deadline:
            time.sleep(0.1)
        scale("order-creator-blue", 0)

    saboteur = threading.Thread(target=degrade_once_blue_is_live)
    saboteur.start()
    back = bluegreen("switch", "--to", "blue", "--yes", "--analysis-seconds", "8")
    saboteur.join()
    assert back.returncode == 1 and back.json["rolled_back"] and back.json["failed"] == "post-switch watch", back.stdout
    assert "order-creator-blue" in back.json["checks"][-1]["detail"]
    assert selected("order-creator") == selected("stock-service") == "green"
    assert bluegreen("status").json["live"] == "green"

    # rollback goes through the same gate: blue is down, so nothing moves; once up, it moves
    scale("order-creator-blue", replicas)
    eventually(lambda: (apps.read_namespaced_deployment("order-creator-blue", namespace)
                                    .status.available_replicas or 0) == replicas, "blue available again")
    rolled = bluegreen("rollback", "--yes", "--analysis-seconds", "1")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert selected() == "blue" and image("regular-consumer") == installed_image
