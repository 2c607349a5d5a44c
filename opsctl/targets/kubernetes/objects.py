"""What the kubernetes target keeps on the cluster besides releases, for the app layer:
opsctl's records (the live colour, each colour's image) and the streaming job's objects (its
model, a Secret of files, and its driver pod). A mixin of KubernetesTarget (self.api,
self._namespace)."""

from __future__ import annotations

import json

from opsctl.errors import OpsError
from opsctl.spec import Spec

RECORDS = "opsctl-live"  # the ConfigMap of opsctl's records: read_record, keep_record
COLOUR_LABEL = "opsctl.io/colour"


class ClusterObjects:
    def read_record(self, spec: Spec, key: str) -> dict | None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            kept = client.CoreV1Api(self.api).read_namespaced_config_map(RECORDS, spec.kubernetes.namespace("services"))
        except ApiException as e:
            if e.status == 404:
                return None
            raise OpsError(f"cannot read opsctl's records (ConfigMap {RECORDS}): {e.reason}", "check the cluster")
        try:
            found = json.loads((kept.data or {}).get(key, ""))
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def keep_record(self, spec: Spec, key: str, record: dict) -> None:
        """Replace one record (one key of the ConfigMap); the others stay."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        namespace, core = spec.kubernetes.namespace("services"), client.CoreV1Api(self.api)
        self._namespace(namespace, spec.platform.name)
        data = {key: json.dumps(record)}
        try:
            core.patch_namespaced_config_map(RECORDS, namespace, {"data": data})
        except ApiException as e:
            if e.status != 404:
                raise
            core.create_namespaced_config_map(namespace, {"metadata": {
                "name": RECORDS, "labels": {"app.kubernetes.io/managed-by": "opsctl"}}, "data": data})

    def selected_colour(self, spec: Spec, service: str) -> str | None:
        """The colour Service `service` sends to (its selector), None if it has none."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            found = client.CoreV1Api(self.api).read_namespaced_service(service, spec.kubernetes.namespace("services"))
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return (found.spec.selector or {}).get(COLOUR_LABEL)

    # --- a job's objects -------------------------------------------------------------------
    def keep_files(self, namespace: str, name: str, files: dict[str, bytes], platform: str) -> None:
        """Secret `name` holds exactly these files (created, else replaced)."""
        import base64

        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self.api)
        self._namespace(namespace, platform)
        body = {"metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "opsctl"}},
                "data": {key: base64.b64encode(data).decode() for key, data in files.items()}}
        try:
            core.replace_namespaced_secret(name, namespace, body)
        except ApiException as e:
            if e.status != 404:
                raise
            core.create_namespaced_secret(namespace, body)

    def pod(self, namespace: str, name: str):
        """Pod `name`, None if there is none."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            return client.CoreV1Api(self.api).read_namespaced_pod(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete_pod(self, namespace: str, name: str) -> bool:
        """Delete pod `name` (what it owns goes with it); False if there was none."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            client.CoreV1Api(self.api).delete_namespaced_pod(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True
