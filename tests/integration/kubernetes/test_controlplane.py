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


def test_a_pods_port_forwarded_through_the_api_server_reaches_the_server_kwok_names(control_plane, namespace):
    """kwok serves the nodes' kubelet API: a port-forward to a pod (through the API server,
    as kubectl and the kubernetes client make it) reaches the real server that a PortForward
    object names for that pod's port, here an HTTP server of this test."""
    import http.server
    import threading

    from kubernetes import client
    from kubernetes.stream import portforward

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"answered behind the pod")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = control_plane.api()
    core = client.CoreV1Api(api)
    try:
        core.create_namespaced_pod(namespace, {"metadata": {"name": "web"}, "spec": {"containers": [
            {"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]}]}})
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "kwok.x-k8s.io", "v1alpha1", namespace, "portforwards", {
                "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "PortForward",
                "metadata": {"name": "web", "namespace": namespace},
                "spec": {"forwards": [{"ports": [8080], "target": {"port": server.server_address[1],
                                                                    "address": "127.0.0.1"}}]}})
        deadline = time.monotonic() + 30
        while core.read_namespaced_pod("web", namespace).status.phase != "Running":
            assert time.monotonic() < deadline, "the pod never ran on a kwok node"
            time.sleep(0.2)
        answer = b""
        while b"answered behind the pod" not in answer and time.monotonic() < deadline:
            forward = portforward(core.connect_get_namespaced_pod_portforward, "web", namespace, ports="8080")
            tunnel = forward.socket(8080)
            tunnel.settimeout(5)
            tunnel.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
            try:
                while b"answered behind the pod" not in answer:
                    chunk = tunnel.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            except OSError:
                time.sleep(0.5)  # kwok had not read the PortForward yet
            finally:
                forward.close()
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"answered behind the pod"), answer
    finally:
        server.shutdown()
