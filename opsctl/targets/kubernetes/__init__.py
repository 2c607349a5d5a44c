"""The kubernetes target: each server a helm release of the project's chart
(manifests/charts/<chart>, components' `release()`) in the namespace of its concern
(platform.yaml `kubernetes.namespaces`), on a kube context: --context and --kubeconfig, else
$KUBECONFIG's (or ~/.kube/config's) current one. Helm is driven as a program (helm.py);
the cluster is read with the kubernetes client. The generated credentials of a release live
in its Secret <release>-credentials, never in a file here and never printed.

A release is upgraded only when what opsctl would apply changed: the fingerprint of the
chart and its values is the description of the revision opsctl made (`helm history`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets as pysecrets
import subprocess
import tempfile
from functools import cached_property
from pathlib import Path

from opsctl.components.base import Health, Outcome, Release, Server, fingerprint
from opsctl.errors import OpsError, UsageError, first_line
from opsctl.net import Address
from opsctl.spec import Spec
from opsctl.targets import Target
from opsctl.targets.kubernetes.objects import COLOUR_LABEL, ClusterObjects

CHARTS = Path(__file__).resolve().parents[3] / "manifests" / "charts"
NOT_YET = "not yet on the kubernetes target"
APPLIED = "opsctl applied "  # + the fingerprint: a revision's description
CREDENTIAL_KEYS = {"admin_password": "password"}  # opsctl's name of a credential -> its key in a release's Secret


def chart_digest(chart: Path) -> str:
    def content(path: Path) -> str:  # a packaged subchart (.tgz) by its hash
        data = path.read_bytes()
        try:
            return data.decode()
        except UnicodeDecodeError:
            return hashlib.sha256(data).hexdigest()

    return fingerprint(*[(str(p.relative_to(chart)), content(p)) for p in sorted(chart.rglob("*")) if p.is_file()])


class KubernetesTarget(ClusterObjects, Target):
    name = "kubernetes"

    # --- the cluster -------------------------------------------------------------------
    @cached_property
    def kind_cluster(self) -> str | None:
        """The kind cluster opsctl makes (step 1) and uses: when neither --context nor
        --kubeconfig is given and a Docker engine runs. None: the given (or current) context."""
        from opsctl.host import docker_engine

        if self.options.get("context") or self.options.get("kubeconfig") or not docker_engine():
            return None
        return re.sub(r"[^a-z0-9.-]+", "-", (self.options.get("kind_name") or "opsctl").lower())  # kind's names

    @property
    def kind_kubeconfig(self) -> Path:
        """Where step 1 writes the kind cluster's kubeconfig (private, like all of .opsctl)."""
        return self.state_dir / "kind" / "kubeconfig"

    def cluster_exists(self) -> bool:
        """False only for the kind cluster that step 1 has not created yet."""
        return not self.kind_cluster or self.kind_kubeconfig.is_file()

    @cached_property
    def kubeconfig(self) -> Path:
        if self.kind_cluster:
            if not self.kind_kubeconfig.is_file():
                raise UsageError(f"there is no kind cluster {self.kind_cluster} yet",
                                 "run `opsctl install --target kubernetes` (its step 1 creates it), "
                                 "or pass --context NAME for another cluster")
            return self.kind_kubeconfig
        given = self.options.get("kubeconfig") or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
        path = Path(given or Path.home() / ".kube" / "config").expanduser()
        if not path.is_file():
            raise UsageError(f"no kubeconfig at {path}",
                             "pass --kubeconfig FILE (or set KUBECONFIG) for the cluster to install on; "
                             "where Docker runs, leave both out and install makes a kind cluster")
        return path

    @cached_property
    def kube_context(self) -> str:
        import yaml

        if self.kind_cluster:
            return f"kind-{self.kind_cluster}"
        try:
            config = yaml.safe_load(self.kubeconfig.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"cannot read the kubeconfig {self.kubeconfig}: {e}", "pass a valid --kubeconfig")
        names = [c.get("name") for c in config.get("contexts") or []]
        wanted = self.options.get("context") or config.get("current-context")
        if not wanted or wanted not in names:
            raise UsageError(f"no context {wanted!r} in {self.kubeconfig}" if wanted else
                             f"{self.kubeconfig} has no current context",
                             f"pass --context with one of: {', '.join(n for n in names if n) or '(none)'}")
        return wanted

    @cached_property
    def api(self):
        return self.new_api()

    def new_api(self):
        """An API client of the context (the tunnels have one of their own)."""
        from kubernetes import config

        try:
            return config.new_client_from_config(config_file=str(self.kubeconfig), context=self.kube_context)
        except Exception as e:  # the client's own errors for a broken entry
            raise UsageError(f"context {self.kube_context} of {self.kubeconfig} is not usable: {e}",
                             "fix the kubeconfig, or pass another --context")

    def check_available(self) -> None:
        """The context exists and its API server answers (5 s); a kind cluster not made
        yet is step 1's to make."""
        from kubernetes import client

        if not self.cluster_exists():
            return
        try:
            client.VersionApi(self.api).get_code(_request_timeout=5)
        except Exception as e:
            raise OpsError(f"the cluster of context {self.kube_context} does not answer: {first_line(e)}",
                           "check that it is running and that the kubeconfig's server address is right") from None

    def where(self) -> str:
        if not self.cluster_exists():
            return f"the kind cluster {self.kind_cluster}, which step 1 makes (a Docker engine runs, no --context given)"
        return f"the cluster of context {self.kube_context} ({self.api.configuration.host}, from {self.kubeconfig})"

    def private_dir(self) -> Path:
        """A folder per context (0700): what opsctl holds of one cluster's platform."""
        folder = self.state_dir / "kubernetes" / re.sub(r"[^A-Za-z0-9._-]+", "_", self.kube_context)
        for made in (folder.parent, folder):
            made.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder

    def is_kind(self) -> bool:
        """A kind cluster: opsctl's, or one whose nodes kind made (their provider ID)."""
        from kubernetes import client

        if self.kind_cluster:
            return True
        nodes = client.CoreV1Api(self.api).list_node(limit=1, _request_timeout=10).items
        return bool(nodes) and (nodes[0].spec.provider_id or "").startswith("kind://")

    @property
    def cache(self) -> Path:
        return Path(os.environ.get("OPSCTL_CACHE_DIR") or self.state_dir / "cache")

    def chart(self, release: Release) -> Path:
        """The project's chart, or an add-on's upstream chart (fetched into the cache once)."""
        from opsctl.targets.kubernetes import charts

        if not release.upstream:
            return CHARTS / release.chart
        return charts.fetch(release.upstream, self.cache, lambda *args, **kw: self.helm(*args, cluster=False, **kw))

    def prepare(self, server: Server) -> None:
        """helm, and an add-on's upstream chart: into the cache, once (no cluster needed)."""
        from opsctl.targets.kubernetes import helm

        helm.binary(self.cache)
        release = server.release()
        if release is not None:
            self.chart(release)

    def helm(self, *args: str, timeout: float | None = None, cluster: bool = True) -> subprocess.CompletedProcess:
        """helm ARGS, on this target's cluster (`cluster`: else on none, as `helm pull`)."""
        from opsctl.targets.kubernetes import helm

        binary = helm.binary(self.cache)
        on = ["--kubeconfig", str(self.kubeconfig), "--kube-context", self.kube_context] if cluster else []
        try:
            return subprocess.run([str(binary), *on, *args], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise OpsError(f"helm {args[0]} did not finish in {timeout:.0f} s",
                           "check the cluster (its events, its nodes), then run again") from None

    # --- where things are ----------------------------------------------------------------
    def address(self, spec: Spec, name: str, port: str = "", colour: str | None = None) -> Address:
        """A Service's cluster DNS name. A bundled service's Service sends to the live colour
        (`colour` given: that colour's own Service); the mesh's upstreams are the sidecar's
        local listeners, on the port of the service they reach."""
        if name == "mesh":
            what, _, upstream = port.partition("/upstream/")
            if upstream:
                return Address("127.0.0.1", spec.services[upstream].port)
            if what.startswith("ingress/"):
                service = what.removeprefix("ingress/")
                return Address(f"ingress-gateway.{spec.kubernetes.namespace('consul')}.svc.cluster.local",
                               spec.services[service].port)
        elif name in spec.services:
            service = spec.services[name]
            host = f"{name}-{colour}" if colour and service.per_colour else name
            return Address(f"{host}.{spec.kubernetes.namespace('services')}.svc.cluster.local",
                           service.port or service.metrics_port)
        entry = spec.components.get(name)
        if entry is None or not entry.ports or (port and port not in entry.ports):
            raise UsageError(f"{name} has no address on the kubernetes target yet", "use --target local")
        number = entry.ports[port] if port else next(iter(entry.ports.values()))
        return Address(f"{name}.{spec.kubernetes.namespace(name)}.svc.cluster.local", number)

    @cached_property
    def tunnels(self):
        from opsctl.targets.kubernetes.tunnel import Tunnels

        return Tunnels(self.new_api)

    def reach(self, spec: Spec, name: str, port: str = "") -> Address:
        """A port-forward from this machine to a ready pod behind `name`'s Service."""
        inside = self.address(spec, name, port)
        service, _, rest = inside.host.partition(".")
        namespace, _, domain = rest.partition(".")
        if domain != "svc.cluster.local":
            raise UsageError(f"opsctl cannot reach {name} {port} on the kubernetes target", "use --target local")
        return self.tunnels.reach(service, namespace, inside.port)

    def credential(self, spec: Spec, component: str, key: str, dry_run: bool = False) -> str:
        """From the Secret <component>-credentials of its release, where the charts call a
        server's one admin password `password`."""
        import base64

        from kubernetes import client
        from kubernetes.client.rest import ApiException

        namespace, name = spec.kubernetes.namespace(component), f"{component}-credentials"
        field = CREDENTIAL_KEYS.get(key, key)
        try:
            held = client.CoreV1Api(self.api).read_namespaced_secret(name, namespace).data or {}
        except ApiException as e:
            if e.status != 404:
                raise OpsError(f"cannot read Secret {name} in {namespace}: {e.reason}", "check the cluster") from None
            held = {}
        if field in held:
            return base64.b64decode(held[field]).decode()
        if dry_run:
            return "(to be generated)"
        raise OpsError(f"Secret {name} in {namespace} holds no {field} (generated when {component} is installed)",
                       f"install it first: opsctl install --target kubernetes --only {component}")

    def _where(self, server: Server) -> tuple[str, str]:
        """Its release's name and namespace: its own, or the step's it belongs to (placed_with)."""
        placed = getattr(server, "placed_with", None) or server.name
        return server.name, server.ctx.spec.kubernetes.namespace(placed)

    # --- releases ------------------------------------------------------------------------
    def _namespace(self, namespace: str, platform: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self.api)
        labels = {"opsctl.io/platform": platform}
        try:
            core.create_namespace({"metadata": {"name": namespace, "labels": labels}})
        except ApiException as e:
            if e.status != 409:
                raise
            core.patch_namespace(namespace, {"metadata": {"labels": labels}})

    def _credentials(self, name: str, namespace: str, keys: list[str]) -> None:
        """The release's Secret holds each key, generated the first time; kept after."""
        import base64

        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core, secret = client.CoreV1Api(self.api), f"{name}-credentials"
        try:
            held = core.read_namespaced_secret(secret, namespace).data or {}
        except ApiException as e:
            if e.status != 404:
                raise
            held = None
        # hex: safe in an environment variable, a URL and a MongoDB key file alike
        missing = {k: base64.b64encode(pysecrets.token_hex(24).encode()).decode()
                   for k in keys if k not in (held or {})}
        if held is None:
            core.create_namespaced_secret(namespace, {"metadata": {"name": secret, "labels": {
                "app.kubernetes.io/instance": name, "app.kubernetes.io/managed-by": "opsctl"}}, "data": missing})
        elif missing:
            core.patch_namespaced_secret(secret, namespace, {"data": missing})

    def _applied(self, name: str, namespace: str) -> str | None:
        """The fingerprint the deployed release was applied with; None if there is none."""
        status = self.helm("status", name, "-n", namespace, "-o", "json", timeout=60)
        info = json.loads(status.stdout).get("info", {}) if status.returncode == 0 else {}
        if info.get("status") != "deployed":
            return None
        return (info.get("description") or "").removeprefix(APPLIED) or None

    def rendering(self, server: Server) -> tuple[str, str, Path, dict]:
        """What helm is given for `server`: its release's name, namespace, chart and values."""
        release = server.release()
        name, namespace = self._where(server)
        # an upstream chart's values schema may refuse any value it does not know
        values = release.values if release.upstream else {**release.values, "platform": server.ctx.spec.platform.name}
        return name, namespace, self.chart(release), values

    def apply(self, server: Server) -> Outcome:
        release = server.release()
        if release is None:
            return Outcome("skipped", NOT_YET)
        name, namespace, chart, values = self.rendering(server)
        platform = server.ctx.spec.platform.name
        wanted = fingerprint(chart_digest(chart), values, release.secrets)
        applied = self._applied(name, namespace) if self.cluster_exists() else None
        if applied == wanted:
            return self._converged(server, Outcome("unchanged", f"release {name} in {namespace}"))
        action = "install" if applied is None and not self.running(server) else "upgrade"
        if server.ctx.dry_run:
            return Outcome("planned", f"{action} release {name} ({release.chart} chart) in {namespace}")
        self._namespace(namespace, platform)
        if release.secrets:
            self._credentials(name, namespace, release.secrets)
        spec = server.ctx.spec.kubernetes
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="opsctl-values-") as file:
            json.dump(values, file)
            file.flush()
            done = self.helm("upgrade", "--install", name, str(chart), "-n", namespace, "-f", file.name,
                             "--description", APPLIED + wanted,
                             "--wait", "--timeout", f"{spec.timeout_seconds}s", "--history-max", str(spec.history_max),
                             "--rollback-on-failure",
                             timeout=2 * spec.timeout_seconds + 60)  # its wait, then its rollback's
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise OpsError(f"helm {action} of {name} in {namespace} failed (rolled back to the last good "
                           f"revision): {tail}",
                           f"see `helm history {name} -n {namespace}` and the events of namespace {namespace}")
        done_as = "installed" if action == "install" else "upgraded"
        return self._converged(server, Outcome("changed", f"{done_as} release {name} in {namespace}"))

    @staticmethod
    def _converged(server: Server, applied: Outcome) -> Outcome:
        """Its ready pod brought to the state opsctl keeps it in (Vault unsealed), through a
        port-forward, for a server that converges on a cluster too."""
        done = server.converge() if server.converges_on_cluster and not server.ctx.dry_run else None
        if not done:
            return applied
        return Outcome("changed", f"{applied.detail}, {done}" if applied.state == "changed" else done)

    def running(self, server: Server) -> bool:
        if not self.cluster_exists():
            return False
        name, namespace = self._where(server)
        return self.helm("status", name, "-n", namespace, timeout=60).returncode == 0

    def workloads(self, name: str, namespace: str, colour: str | None = None) -> list:
        """The StatefulSets, Deployments and DaemonSets of release `name` (of one colour, if given)."""
        from kubernetes import client

        apps = client.AppsV1Api(self.api)
        selector = f"app.kubernetes.io/instance={name}" + (f",{COLOUR_LABEL}={colour}" if colour else "")
        return (apps.list_namespaced_stateful_set(namespace, label_selector=selector).items
                + apps.list_namespaced_deployment(namespace, label_selector=selector).items
                + ([] if colour else apps.list_namespaced_daemon_set(namespace, label_selector=selector).items))

    @staticmethod
    def _desired(workload) -> int:
        from kubernetes.client import V1DaemonSet

        if isinstance(workload, V1DaemonSet):  # a pod per node it fits on
            return workload.status.desired_number_scheduled or 0
        return workload.spec.replicas or 0

    @staticmethod
    def _ready(workload) -> int:
        """Its pods that are ready on its current template (a Deployment mid-rollout counts
        only its new ones, once they are available)."""
        from kubernetes.client import V1DaemonSet, V1Deployment

        status = workload.status
        if isinstance(workload, V1DaemonSet):
            return min(status.number_ready or 0, status.updated_number_scheduled or 0)
        if not isinstance(workload, V1Deployment):
            return status.ready_replicas or 0
        if (status.observed_generation or 0) < (workload.metadata.generation or 0):
            return 0
        return min(status.ready_replicas or 0, status.updated_replicas or 0, status.available_replicas or 0)

    def ready_endpoints(self, service: str, namespace: str) -> int:
        """The ready addresses behind Service `service` (its EndpointSlices)."""
        from kubernetes import client

        slices = client.DiscoveryV1Api(self.api).list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}").items
        return sum(1 for s in slices for e in s.endpoints or [] if e.conditions is None or e.conditions.ready)

    def health(self, server: Server) -> Health:
        """Ready/desired over its release's workloads. A bundled service's colour (server.colour)
        is healthy when its Deployment is and as many pods answer behind its Service."""
        from kubernetes.client.rest import ApiException

        report = server._health
        if server.release() is None:
            return report("n/a", detail=NOT_YET)
        name, namespace = self._where(server)
        endpoint, colour = server.endpoint(), getattr(server, "colour", None)
        try:
            workloads = self.workloads(name, namespace, colour)
            if not workloads:
                if self.running(server) and not colour:  # a release of configuration only (the mesh's entries)
                    return report("healthy", endpoint=endpoint, detail=f"release deployed in {namespace}")
                return report("unhealthy", endpoint=endpoint, detail=f"not installed in {namespace}")
            ready = sum(self._ready(w) for w in workloads)
            desired = sum(self._desired(w) for w in workloads)
            detail = f"{ready}/{desired} ready in {namespace}"
            if colour and desired and ready >= desired:
                answering = self.ready_endpoints(f"{name}-{colour}", namespace)
                ready = min(ready, answering)
                detail += f", {answering} behind Service {name}-{colour}"
        except ApiException as e:
            return report("unhealthy", endpoint=endpoint, detail=f"cannot read it: {e.reason}")
        image = workloads[0].spec.template.spec.containers[0].image
        healthy = bool(desired) and ready >= desired
        if healthy and server.converges_on_cluster:  # in the state opsctl keeps it in (Vault unsealed)?
            try:
                healthy, inside = server.health_detail()
            except Exception as e:  # a health check says what it saw, whatever failed
                healthy, inside = False, f"cannot reach it: {first_line(e)}"
            detail += f", {inside}"
        return report("healthy" if healthy else "unhealthy", endpoint=endpoint,
                      version=image.partition("@")[0].rpartition(":")[2], detail=detail)

    def stop(self, server: Server) -> bool:
        """Uninstall its release (its data volume and credentials stay until a purge)."""
        if server.release() is None or not self.running(server):
            return False
        name, namespace = self._where(server)
        done = self.helm("uninstall", name, "-n", namespace, "--wait", timeout=300)
        if done.returncode != 0:
            raise OpsError(f"helm uninstall of {name} in {namespace} failed: {done.stderr.strip()[-300:]}",
                           "run `opsctl down --target kubernetes` again")
        return True

    def purge(self, server: Server) -> None:
        """Its data volumes and its credentials."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        if server.release() is None:
            return
        name, namespace = self._where(server)
        core = client.CoreV1Api(self.api)
        try:
            core.delete_collection_namespaced_persistent_volume_claim(
                namespace, label_selector=f"app.kubernetes.io/instance={name}")
            core.delete_namespaced_secret(f"{name}-credentials", namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    def logfile(self, server: Server) -> Path:
        name, namespace = self._where(server)
        raise UsageError(f"{name} logs to its pod on the kubernetes target",
                         f"kubectl logs -n {namespace} statefulset/{name}")
