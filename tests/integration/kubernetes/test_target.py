"""`opsctl install|status|down --target kubernetes` on the real control plane: a server becomes
a helm release of the project's chart in its namespace, with its credentials generated
into a Secret, a NetworkPolicy that admits only the services that use it, and its own
ServiceAccount; a re-install changes nothing, a changed value upgrades that release only,
down uninstalls and keeps the data until --purge. The servers with a chart so far: RabbitMQ,
MongoDB, PostgreSQL, Vault (OpenBao), Redis, Kafka and Keycloak, with the bundled services
(blue and green Deployments behind one Service on the live colour); every other step says
it is not on this target yet."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest
import yaml

from opsctl.targets.kubernetes import CHARTS
from tests.integration.controlplane import helm
from tests.integration.kubernetes.conftest import kube

pytestmark = pytest.mark.integration

SERVERS = ("rabbitmq", "mongodb", "postgres", "vault", "redis", "kafka", "keycloak")  # those with a chart


def test_install_reinstall_upgrade_status_down_and_purge(control_plane, work, stand_ins):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = control_plane.api()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    namespace = work.spec.kubernetes.namespace("redis")

    only = ["--only", ",".join(SERVERS + ("registry",))]
    planned = work.run("install", *kube(control_plane, *only, "--dry-run", "-o", "json"), check_json=True)
    assert planned.returncode == 0, planned.stderr
    steps = {s["name"]: s for s in planned.json["steps"]}
    assert {steps[s]["state"] for s in SERVERS} == {"planned"}
    assert steps["registry"]["state"] == "skipped" and "not yet" in steps["registry"]["detail"]
    for server in SERVERS:  # a plan changes nothing (other tests may have left the namespaces)
        where = work.spec.kubernetes.namespace(server)
        assert not core.list_namespaced_secret(where, label_selector=f"app.kubernetes.io/instance={server}").items
        assert not apps.list_namespaced_stateful_set(where).items

    stand_ins(work, "vault", "mongodb")  # install unseals Vault and initiates MongoDB's set in their pods
    installed = work.run("install", *kube(control_plane, *only, "-o", "json"), check_json=True)
    assert installed.returncode == 0, installed.stdout
    states = {s["name"]: s["state"] for s in installed.json["steps"]}
    assert {states[s] for s in SERVERS} == {"changed"}
    users = {server: sorted(n for n, s in work.spec.services.items() if server in s.credentials)
             for server in ("redis", "postgres", "rabbitmq", "mongodb")}
    users.update(vault=sorted(work.spec.services), keycloak=sorted(work.spec.services),
                 kafka=["cdc-bridge", "order-screening"])
    for server in SERVERS:
        where = work.spec.kubernetes.namespace(server)
        policy = client.NetworkingV1Api(api).read_namespaced_network_policy(server, where)
        assert policy.spec.ingress[0]._from[0].pod_selector.match_expressions[0].values == users[server]
        workload = apps.read_namespaced_stateful_set(server, where)
        assert workload.status.ready_replicas == 1, server
        assert workload.spec.template.spec.containers[0].image == work.spec.components[server].image
    edge = work.spec.kubernetes.namespace("nginx")  # people get their tokens through the edge
    keycloak = client.NetworkingV1Api(api).read_namespaced_network_policy("keycloak", work.spec.kubernetes.namespace("keycloak"))
    assert keycloak.spec.ingress[0]._from[1].namespace_selector.match_labels == {"kubernetes.io/metadata.name": edge}
    mongodb = apps.read_namespaced_stateful_set("mongodb", work.spec.kubernetes.namespace("mongodb")).spec.template.spec
    assert mongodb.volumes[0].secret.default_mode == 0o400 and "--keyFile" in mongodb.containers[0].args
    keycloak = apps.read_namespaced_stateful_set("keycloak", work.spec.kubernetes.namespace("keycloak"))
    issuer = f"--hostname=http://keycloak.{work.spec.kubernetes.namespace('keycloak')}.svc.cluster.local:"
    assert any(a.startswith(issuer) for a in keycloak.spec.template.spec.containers[0].args)  # one issuer
    kafka = apps.read_namespaced_stateful_set("kafka", work.spec.kubernetes.namespace("kafka")).spec.template.spec
    env = {e.name: e.value for e in kafka.containers[0].env}
    assert f"PLAINTEXT://kafka.{work.spec.kubernetes.namespace('kafka')}.svc.cluster.local:" in env[
        "KAFKA_ADVERTISED_LISTENERS"]
    workload = apps.read_namespaced_stateful_set("redis", namespace)
    assert workload.status.ready_replicas == 1
    assert workload.spec.template.spec.containers[0].image == work.spec.components["redis"].image
    password = base64.b64decode(core.read_namespaced_secret("redis-credentials", namespace).data["password"]).decode()
    assert len(password) >= 24 and password not in installed.stdout + installed.stderr
    assert core.read_namespace(namespace).metadata.labels["opsctl.io/platform"] == work.spec.platform.name
    assert core.read_namespaced_service_account("redis", namespace).automount_service_account_token is False

    again = work.run("install", *kube(control_plane, *only, "-o", "json"), check_json=True)
    states = {s["name"]: s["state"] for s in again.json["steps"]}
    assert {states[s] for s in SERVERS} == {"unchanged"}

    work.write_config({"components": {"redis": {"image": "redis:7.0.16"}}})
    upgraded = work.run("install", *kube(control_plane, "--only", "redis", "-o", "json"), check_json=True)
    assert upgraded.json["steps"][0]["state"] == "changed" and "upgraded" in upgraded.json["steps"][0]["detail"]
    image = apps.read_namespaced_stateful_set("redis", namespace).spec.template.spec.containers[0].image
    assert image == "redis:7.0.16"
    assert base64.b64decode(core.read_namespaced_secret(  # the credentials outlive an upgrade
        "redis-credentials", namespace).data["password"]).decode() == password

    status = work.run("status", *kube(control_plane, "-o", "json"), check_json=True)
    rows = {c["component"]: c for c in status.json["components"]}
    assert {rows[s]["health"] for s in SERVERS} == {"healthy"}, status.stdout
    assert status.returncode == 3 and rows["order-creator"]["health"] == "unhealthy"  # not installed here
    redis = rows["redis"]
    assert (redis["health"], redis["version"]) == ("healthy", "7.0.16")
    assert redis["endpoint"] == f"redis.{namespace}.svc.cluster.local:{work.spec.components['redis'].ports['redis']}"

    # An upgrade whose pod never becomes ready (no node takes it) is rolled back by itself.
    full = {"key": "opsctl.test/full", "effect": "NoSchedule"}
    nodes = core.list_node().items
    for node in nodes:
        core.patch_node(node.metadata.name, {"spec": {"taints": [*(node.spec.taints or []), full]}})
    try:
        work.write_config({"components": {"redis": {"image": "redis:7.0.17"}}, "kubernetes": {"timeout_seconds": 10}})
        refused = work.run("install", *kube(control_plane, "--only", "redis", "-o", "json"), check_json=True)
        assert refused.returncode == 1 and "rolled back to the last good revision" in refused.json["steps"][0]["detail"]
        image = apps.read_namespaced_stateful_set("redis", namespace).spec.template.spec.containers[0].image
        assert image == "redis:7.0.16"  # the last good revision's
    finally:
        for node in nodes:
            core.patch_node(node.metadata.name, {"spec": {"taints": node.spec.taints or None}})

    down = work.run("down", *kube(control_plane, "-o", "json"), check_json=True)
    assert down.returncode == 0
    assert set(down.json["stopped"]) == set(SERVERS)
    after = work.run("status", *kube(control_plane, "-o", "json"), check_json=True)
    assert after.returncode == 3
    assert {c["component"]: c for c in after.json["components"]}["redis"]["health"] == "unhealthy"
    assert core.read_namespaced_secret("redis-credentials", namespace)  # kept until --purge
    assert core.list_namespaced_persistent_volume_claim(namespace).items

    purged = work.run("down", *kube(control_plane, "--purge", "--yes"))
    assert purged.returncode == 0, purged.stderr
    with pytest.raises(ApiException):
        core.read_namespaced_secret("redis-credentials", namespace)
    assert not [c for c in core.list_namespaced_persistent_volume_claim(namespace).items
                if not c.metadata.deletion_timestamp]


def test_a_missing_cluster_or_context_is_a_usage_error(control_plane, work, tmp_path):
    missing = work.run("install", "--target", "kubernetes", "--kubeconfig", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no kubeconfig at" in missing.stderr and "Traceback" not in missing.stderr
    unknown = work.run("status", *kube(control_plane, "--context", "elsewhere"))
    assert unknown.returncode == 2 and "no context 'elsewhere'" in unknown.stderr and "opsctl-test" in unknown.stderr
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1"
    (tmp_path / "down.yaml").write_text(json.dumps(config))
    unreachable = work.run("status", "--target", "kubernetes", "--kubeconfig", str(tmp_path / "down.yaml"))
    assert unreachable.returncode == 1 and "does not answer" in unreachable.stderr
    local = work.run("status", "--context", "opsctl-test")
    assert local.returncode == 2 and "--target kubernetes" in local.stderr


def test_the_services_run_in_both_colours_behind_the_live_one_each_with_least_privilege(control_plane, work):
    from kubernetes import client

    api = control_plane.api()
    apps, core, rbac = client.AppsV1Api(api), client.CoreV1Api(api), client.AuthorizationV1Api(api)
    namespace = work.spec.kubernetes.namespace("services")
    installed = work.run("install", *kube(control_plane, "--only", "services", "-o", "json"), check_json=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    for colour in ("blue", "green"):
        deployment = apps.read_namespaced_deployment(f"order-creator-{colour}", namespace)
        assert deployment.status.available_replicas == work.spec.kubernetes.replicas
        annotations = deployment.spec.template.metadata.annotations
        assert annotations["consul.hashicorp.com/connect-service-upstreams"] == (
            f"stock-service:{work.spec.services['stock-service'].port}")
    assert core.read_namespaced_service("order-creator", namespace).spec.selector["opsctl.io/colour"] == "blue"
    assert apps.read_namespaced_deployment("regular-consumer", namespace)  # a worker runs once
    policy = client.NetworkingV1Api(api).read_namespaced_network_policy("stock-service", namespace)
    assert policy.spec.ingress[0]._from[0].pod_selector.match_expressions[0].values == ["order-creator"]
    # the edge's routes, through the Service that sends to the live colour
    ingress = client.NetworkingV1Api(api).read_namespaced_ingress("order-creator", namespace).spec
    paths = {p.path: (p.path_type, p.backend.service.name) for p in ingress.rules[0].http.paths}
    assert ingress.ingress_class_name == "opsctl-edge"
    assert paths["/order/"] == ("Prefix", "order-creator") and paths["/create"] == ("Exact", "order-creator")

    def may(verb: str, resource: str, name: str = "") -> bool:
        review = rbac.create_subject_access_review({"spec": {
            "user": f"system:serviceaccount:{namespace}:order-creator",
            "resourceAttributes": {"namespace": namespace, "verb": verb, "resource": resource, "name": name}}})
        return review.status.allowed

    assert may("get", "secrets", "order-creator-credentials")
    assert not may("get", "secrets", "stock-service-credentials") and not may("list", "pods")

    # No Consul CRDs on this cluster (the hashicorp/consul chart cannot be fetched here): the
    # CRs are rendered where the API exists, as helm shows with that API version given.
    kubeconfig = ["--kubeconfig", str(control_plane.kubeconfig)]
    manifest = subprocess.run([str(helm()), *kubeconfig, "get", "manifest", "stock-service", "-n", namespace],
                              capture_output=True, text=True, check=True).stdout
    assert "kind: Deployment" in manifest and "consul.hashicorp.com/v1alpha1" not in manifest
    values = subprocess.run([str(helm()), *kubeconfig, "get", "values", "stock-service", "-n", namespace, "-o", "json"],
                            capture_output=True, text=True, check=True).stdout
    rendered = subprocess.run([str(helm()), "template", "stock-service", str(CHARTS / "order-service"), "-f", "-",
                               "--api-versions", "consul.hashicorp.com/v1alpha1"], input=values,
                              capture_output=True, text=True, check=True).stdout
    crs = {d["kind"]: d for d in yaml.safe_load_all(rendered) if d and d["apiVersion"].startswith("consul.")}
    assert set(crs) == {"ServiceDefaults", "ServiceResolver", "ServiceRouter", "ServiceIntentions"}
    assert {"name": "order-creator", "action": "allow"} in crs["ServiceIntentions"]["spec"]["sources"]
    assert crs["ServiceResolver"]["spec"]["failover"]["*"]["targets"] == [{"peer": "dc2"}]

    again = work.run("install", *kube(control_plane, "--only", "services", "-o", "json"), check_json=True)
    assert again.json["steps"][0]["state"] == "unchanged", again.stdout
    status = work.run("status", *kube(control_plane, "-o", "json"), check_json=True)
    rows = {c["component"]: c for c in status.json["components"]}
    assert rows["order-creator"]["health"] == "healthy" and rows["mesh-config"]["health"] == "healthy"
    assert rows["order-creator"]["detail"].startswith(f"{2 * work.spec.kubernetes.replicas}/")
    work.run("down", *kube(control_plane))


def test_the_add_ons_come_from_their_upstream_charts_or_fail_saying_why(control_plane, work):
    from kubernetes import client

    api = control_plane.api()
    planned = work.run("install", *kube(control_plane, "--dry-run", "-o", "json"), check_json=True)
    assert planned.returncode == 1, planned.stdout
    steps = {s["name"]: s for s in planned.json["steps"]}
    assert steps["cert-manager"]["state"] == "planned" and "jetstack/cert-manager v1.16.5" in steps["cert-manager"]["detail"]
    for addon in ("consul", "prometheus-grafana", "airflow"):
        assert steps[addon]["state"] == "failed" and "cannot be fetched" in steps[addon]["detail"], steps[addon]
    assert "Go module proxy has no github.com/hashicorp/consul-k8s/charts@v1.0.12" in steps["consul"]["detail"]
    assert "grafana" in steps["prometheus-grafana"]["detail"] and "helm pull" in steps["airflow"]["detail"]
    assert steps["nginx"]["state"] == "planned" and "ingress-nginx/ingress-nginx 4.11.0" in steps["nginx"]["detail"]

    installed = work.run("install", *kube(control_plane, "--only", "cert-manager,nginx,consul", "-o", "json"),
                         check_json=True)
    states = {s["name"]: s["state"] for s in installed.json["steps"]}
    assert installed.returncode == 1, installed.stdout
    assert states == {"cert-manager": "changed", "nginx": "changed", "consul": "failed"}, installed.stdout
    edge = work.spec.kubernetes.namespace("nginx")  # the edge: ingress-nginx with the local edge's limits
    config = client.CoreV1Api(api).read_namespaced_config_map("nginx", edge).data
    assert (config["proxy-body-size"], config["client-header-timeout"], config["proxy-next-upstream"]) == (
        "64k", "5", "off")
    ports = {p.name: p.port for p in client.CoreV1Api(api).read_namespaced_service("nginx", edge).spec.ports}
    assert ports["http"] == work.spec.components["nginx"].ports["http"]
    assert client.NetworkingV1Api(api).read_ingress_class("opsctl-edge").spec.controller == "k8s.io/opsctl-edge"
    namespace = work.spec.kubernetes.namespace("cert-manager")
    for deployment in ("cert-manager", "cert-manager-webhook", "cert-manager-cainjector"):
        assert client.AppsV1Api(api).read_namespaced_deployment(deployment, namespace).status.available_replicas == 1
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition("certificates.cert-manager.io")
    assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
    again = work.run("install", *kube(control_plane, "--only", "cert-manager", "-o", "json"), check_json=True)
    assert again.returncode == 0 and again.json["steps"][0]["state"] == "unchanged"
    status = work.run("status", *kube(control_plane, "-o", "json"), check_json=True)
    rows = {c["component"]: c for c in status.json["components"]}
    assert rows["cert-manager"]["health"] == "healthy" and rows["consul"]["health"] == "unhealthy"
    assert (rows["nginx"]["health"], rows["nginx"]["endpoint"], rows["nginx"]["version"]) == (
        "healthy", f"nginx.{edge}.svc.cluster.local:{ports['http']}", "v1.11.0")
    down = work.run("down", *kube(control_plane, "-o", "json"), check_json=True)
    assert down.returncode == 0 and {"cert-manager", "nginx"} <= set(down.json["stopped"])

    # fetch: helm and the add-ons' charts, before any cluster exists
    fetched = work.run("fetch", "--target", "kubernetes", "--kubeconfig", "/nowhere", "-o", "json", check_json=True)
    rows = {r["component"]: r for r in fetched.json["components"]}
    assert fetched.returncode == 1 and all(rows[a]["ready"] for a in ("cert-manager", "nginx", "metallb", "redis"))
    assert not rows["consul"]["ready"] and "HTTP 403" in rows["consul"]["detail"], rows["consul"]


def test_metallb_gives_a_kind_cluster_its_address_pool_and_skips_any_other(control_plane, work, tmp_path):
    from kubernetes import client

    skipped = work.run("install", *kube(control_plane, "--only", "kind,metallb", "-o", "json"), check_json=True)
    steps = {s["name"]: s for s in skipped.json["steps"]}
    assert skipped.returncode == 0 and steps["kind"]["state"] == steps["metallb"]["state"] == "skipped"
    assert "using the cluster of context opsctl-test" in steps["kind"]["detail"]  # says which
    assert "not a kind cluster" in steps["metallb"]["detail"]

    # A kind cluster, as far as opsctl can tell: a node kind made (its provider ID), and the
    # docker network kind made. No Docker engine runs here, so a stand-in `docker` answers
    # `network inspect kind` as Docker does; and no MetalLB webhook server runs on kwok's
    # nodes, so the API server is told to pass over it (the chart's own switch).
    core = client.CoreV1Api(control_plane.api())
    node = "a-kind-worker"  # listed first: opsctl looks at one node
    core.create_node({"metadata": {"name": node, "annotations": {"kwok.x-k8s.io/node": "fake"}},
                      "spec": {"providerID": f"kind://docker/opsctl/{node}"}})
    (tmp_path / "docker").write_text("#!/bin/sh\n[ \"$*\" = 'network inspect kind' ] || exit 1\necho '" + json.dumps(
        [{"Name": "kind", "IPAM": {"Config": [{"Subnet": "fc00:f853:ccd:e793::/64"}, {"Subnet": "172.18.0.0/16"}]}}])
        + "'\n")
    (tmp_path / "docker").chmod(0o755)
    on_kind = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    work.write_config({"components": {"metallb": {"chart": {"values": {"crds": {"validationFailurePolicy": "Ignore"}}}}}})
    try:
        installed = work.run("install", *kube(control_plane, "--only", "metallb", "-o", "json"), check_json=True,
                             env=on_kind)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "installed release metallb-pool" in installed.json["steps"][0]["detail"]
        namespace = work.spec.kubernetes.namespace("metallb")
        pool = client.CustomObjectsApi(control_plane.api()).get_namespaced_custom_object(
            "metallb.io", "v1beta1", namespace, "ipaddresspools", "metallb-pool")
        assert pool["spec"]["addresses"] == ["172.18.255.200-172.18.255.250"]  # the top of the IPv4 subnet
        assert client.AppsV1Api(control_plane.api()).read_namespaced_daemon_set("metallb-speaker", namespace)
        again = work.run("install", *kube(control_plane, "--only", "metallb", "-o", "json"), check_json=True, env=on_kind)
        assert again.json["steps"][0]["state"] == "unchanged", again.stdout
        status = work.run("status", *kube(control_plane, "-o", "json"), check_json=True, env=on_kind)
        metallb = {c["component"]: c for c in status.json["components"]}["metallb"]
        assert (metallb["health"], metallb["version"]) == ("healthy", "v0.15.2"), metallb
        down = work.run("down", *kube(control_plane, "-o", "json"), check_json=True, env=on_kind)
        assert "metallb" in down.json["stopped"]
        assert subprocess.run([str(helm()), "--kubeconfig", str(control_plane.kubeconfig), "status", "metallb-pool",
                               "-n", namespace], capture_output=True).returncode != 0
    finally:
        core.delete_node(node)
