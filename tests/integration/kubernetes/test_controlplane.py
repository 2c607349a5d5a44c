"""The control plane the kubernetes target is tested on is a real one: its version as helm
and kubectl read it, the scheduler placing pods on kwok's nodes, the controllers making a
Deployment Available, RBAC refusing a ServiceAccount what no role grants it, and the API
server validating a manifest in a server-side dry run."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_it_reports_the_version_it_was_built_at(control_plane):
    from kubernetes import client

    from tests.integration.controlplane import VERSION

    assert client.VersionApi(control_plane.api()).get_code().git_version == f"v{VERSION}"


def test_a_deployment_becomes_available_on_kwok_nodes(control_plane, namespace):
    from kubernetes import client

    api = control_plane.api()
    client.AppsV1Api(api).create_namespaced_deployment(namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}})
    wait_for("3 available replicas", lambda: (client.AppsV1Api(api).read_namespaced_deployment(
        "web", namespace).status.available_replicas or 0) == 3)
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 3
    assert {p.status.phase for p in pods} == {"Running"}
    assert all(p.spec.node_name.startswith("kwok-node-") for p in pods)  # placed by the scheduler


def test_rbac_refuses_what_no_role_grants(control_plane, namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = control_plane.api()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    token = core.create_namespaced_service_account_token("reader", namespace, {"spec": {}}).status.token
    reader = client.Configuration(host=api.configuration.host, api_key={"authorization": token},
                                  api_key_prefix={"authorization": "Bearer"})
    reader.ssl_ca_cert = api.configuration.ssl_ca_cert
    as_reader = client.ApiClient(reader)
    with pytest.raises(ApiException) as refused:
        client.CoreV1Api(as_reader).list_namespaced_config_map(namespace)
    assert refused.value.status == 403
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "read-config"}, "rules": [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "reader-reads-config"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-config"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]})
    wait_for("the role to take effect", lambda: _allowed(client.CoreV1Api(as_reader), namespace))
    with pytest.raises(ApiException) as still:
        client.CoreV1Api(as_reader).list_namespaced_secret(namespace)
    assert still.value.status == 403


def _allowed(core, namespace: str) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        core.list_namespaced_config_map(namespace)
        return True
    except ApiException:
        return False


def test_a_server_side_dry_run_validates_and_stores_nothing(control_plane, namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(control_plane.api())
    good = {"metadata": {"name": "settings"}, "data": {"mode": "dry"}}
    core.create_namespaced_config_map(namespace, good, dry_run="All")
    assert core.list_namespaced_config_map(namespace, field_selector="metadata.name=settings").items == []
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "Not_A_Name"}}, dry_run="All")
    assert refused.value.status == 422
