"""A real Kubernetes control plane on this machine, for the kubernetes target's tests and
benchmarks: etcd, kube-apiserver, kube-controller-manager and kube-scheduler built from their
Go modules (opsctl/builds/kubernetes, etcd), with nodes and pods played by kwok
(opsctl/builds/kwok). The API server, admission, RBAC, the controllers, the scheduler and
helm are real; no container runs: a pod scheduled on a kwok node is reported Running and
Ready without one. kwok also serves the nodes' kubelet API, so a port-forward to a pod
through the API server reaches whatever server a PortForward object (kwok's CRD) names for
that pod's port: a real server on this machine can stand behind a simulated pod.

    python -m tests.integration.controlplane build   # the binaries and helm, once, into the cache (scripts/test)
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VERSION = "1.34.4"  # k8s.io/kubernetes, as pinned in opsctl/builds/kubernetes/go.mod
CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
VERSION_STAMP = {f"k8s.io/component-base/version.{var}": value for var, value in {  # what /version answers
    "gitVersion": f"v{VERSION}", "gitMajor": VERSION.split(".")[0], "gitMinor": VERSION.split(".")[1],
    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z"}.items()}
PROGRAMS = {  # build: ({name: package}, version, link-time stamp)
    "kubernetes": ({p: f"k8s.io/kubernetes/cmd/{p}" for p in CONTROL_PLANE}, VERSION, VERSION_STAMP),
    "etcd": ({"etcd": "go.etcd.io/etcd/server/v3"}, "3.6.16", {}),
    "kwok": ({"kwok": "sigs.k8s.io/kwok/cmd/kwok"}, "0.8.0", {}),
}
KWOK_STAGES = ["node/fast/node-initialize.yaml", "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
               "pod/fast/pod-ready.yaml", "pod/fast/pod-complete.yaml", "pod/fast/pod-delete.yaml"]
PORT_FORWARD_CRD = ["kwok.x-k8s.io_portforwards.yaml"]
SERVICE_RANGE = "10.96.0.0/16"  # the cluster's virtual Service addresses: never routed on this machine


def cache() -> Path:
    from tests.integration.conftest import cache_dir

    return Path(cache_dir())


def build() -> dict[str, Path]:
    """Each program's folder in the cache, built from its wrapper module the first time
    (about 20 minutes of CPU in all; kube-apiserver alone about 8)."""
    from opsctl import artifacts

    return {name: artifacts.go_binaries(name, programs, cache() / f"{name}-{version}", stamp)
            for name, (programs, version, stamp) in PROGRAMS.items()}


def _kwok_module() -> str:
    """kwok's module folder in the Go module cache."""
    from opsctl import artifacts

    found = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kwok"], cwd=artifacts.BUILDS / "kwok",
                           env={**os.environ, "GOFLAGS": "-mod=readonly", "GOTOOLCHAIN": "local"},
                           capture_output=True, text=True, check=True)
    return found.stdout.strip()


def kwok_stages() -> str:
    """kwok's own stage files (node initialise and heartbeat, pod ready, complete and
    delete), read from its module in the Go module cache: without stages kwok does nothing."""
    stage = Path(_kwok_module()) / "kustomize" / "stage"
    return "\n---\n".join((stage / name).read_text() for name in KWOK_STAGES)


def _certificates(folder: Path, host: str) -> None:
    """A CA, the API server's serving certificate for `host`, an admin client certificate
    (group system:masters) and the service-account signing key, as PEM files in folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def key_pem(key) -> bytes:  # "EC PRIVATE KEY", as kubeadm and k3s write it (Spark's client reads no other EC form)
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    def issue(subject: x509.Name, key, issuer_key, issuer: x509.Name, ca: bool = False, sans=None):
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            cert = cert.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return cert.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opsctl-test-ca")])
    files = {"ca.crt": issue(ca_name, ca_key, ca_key, ca_name, ca=True), "ca.key": key_pem(ca_key)}
    server_key = ec.generate_private_key(ec.SECP256R1())
    files["apiserver.crt"] = issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]), server_key, ca_key, ca_name,
        sans=[x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("kubernetes"),
              x509.DNSName("kubernetes.default.svc"), x509.IPAddress(ipaddress.ip_network(SERVICE_RANGE)[1])])
    files["apiserver.key"] = key_pem(server_key)
    admin_key = ec.generate_private_key(ec.SECP256R1())
    files["admin.crt"] = issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opsctl-admin"),
                                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters")]),
                               admin_key, ca_key, ca_name)
    files["admin.key"] = key_pem(admin_key)
    files["sa.key"] = key_pem(ec.generate_private_key(ec.SECP256R1()))
    files["sa.pub"] = serialization.load_pem_private_key(files["sa.key"], None).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, data in files.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o600)


def _kubeconfig(folder: Path, server: str) -> Path:
    import yaml

    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "opsctl-test",
        "clusters": [{"name": "opsctl-test", "cluster": {"server": server,
                                                          "certificate-authority": str(folder / "ca.crt")}}],
        "users": [{"name": "opsctl-admin", "user": {"client-certificate": str(folder / "admin.crt"),
                                                     "client-key": str(folder / "admin.key")}}],
        "contexts": [{"name": "opsctl-test", "context": {"cluster": "opsctl-test", "user": "opsctl-admin"}}]}))
    path.chmod(0o600)
    return path


@dataclass
class ControlPlane:
    """One cluster in `path`: start() brings it up with `nodes` kwok nodes and `volumes`
    persistent volumes, stop() ends
    every process. kubeconfig is an admin's (system:masters). Listed in the integration
    tests' LIVE_WORKDIRS, a failed test's report ends with the tails of its logs."""

    path: Path
    nodes: int = 3
    volumes: int = 40
    host: str = "127.0.0.1"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    api_ready_seconds: float = 0.0

    @property
    def kubeconfig(self) -> Path:
        return self.path / "kubeconfig"

    def logs(self) -> list[Path]:
        return [self.path / f"{name}.log" for name in self.processes]

    def _tails(self, lines: int = 20) -> str:
        return "\n".join(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in self.logs() if log.exists())

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.path / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
        log.close()

    def _wait(self, what: str, ready, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"the control plane did not get {what} ({', '.join(dead) or 'timed out'} "
                                   f"):\n{self._tails()}")
            time.sleep(0.2)

    def start(self) -> ControlPlane:
        from tests.integration.conftest import free_ports

        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o700)
        bins = build()
        began = time.monotonic()
        etcd_client, etcd_peer, api, kubelet = free_ports(4)
        _certificates(self.path, self.host)
        server = f"https://{self.host}:{api}"
        _kubeconfig(self.path, server)
        f = self.path
        self._start("etcd", [str(bins["etcd"] / "etcd"), "--name", "test", "--data-dir", str(f / "etcd"),
                             "--listen-client-urls", f"http://{self.host}:{etcd_client}",
                             "--advertise-client-urls", f"http://{self.host}:{etcd_client}",
                             "--listen-peer-urls", f"http://{self.host}:{etcd_peer}",
                             "--initial-advertise-peer-urls", f"http://{self.host}:{etcd_peer}",
                             "--initial-cluster", f"test=http://{self.host}:{etcd_peer}",
                             "--unsafe-no-fsync", "--log-level", "warn"])
        k8s = bins["kubernetes"]
        self._start("kube-apiserver", [
            str(k8s / "kube-apiserver"), f"--etcd-servers=http://{self.host}:{etcd_client}",
            f"--bind-address={self.host}", f"--advertise-address={self.host}", f"--secure-port={api}",
            "--endpoint-reconciler-type=none",  # a loopback advertise address is refused otherwise
            "--authorization-mode=Node,RBAC", f"--client-ca-file={f / 'ca.crt'}",
            f"--tls-cert-file={f / 'apiserver.crt'}", f"--tls-private-key-file={f / 'apiserver.key'}",
            f"--service-account-key-file={f / 'sa.pub'}", f"--service-account-signing-key-file={f / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc", f"--service-cluster-ip-range={SERVICE_RANGE}",
            "--allow-privileged=true", f"--cert-dir={f / 'certs'}", "--v=1",
            "--kubelet-preferred-address-types=InternalIP"])  # kwok's server: the nodes' kubelet API
        self._wait("its API server ready", lambda: self._ready(server))
        self.api_ready_seconds = time.monotonic() - began  # for scripts/bench/kube_target.py
        # The client limits kwokctl lifts too (its --disable-qps-limits): at the default 20/s the
        # controllers would take minutes to create a thousand pods.
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0", "--v=1",
                  "--kube-api-qps=1000", "--kube-api-burst=2000"]
        self._start("kube-controller-manager", [
            str(k8s / "kube-controller-manager"), *common, "--controllers=*,-nodeipam",
            f"--service-account-private-key-file={f / 'sa.key'}", f"--root-ca-file={f / 'ca.crt'}",
            f"--cluster-signing-cert-file={f / 'ca.crt'}", f"--cluster-signing-key-file={f / 'ca.key'}"])
        self._start("kube-scheduler", [str(k8s / "kube-scheduler"), *common])
        (f / "kwok-stages.yaml").write_text(kwok_stages())
        self._install_crds(PORT_FORWARD_CRD)
        # kwok also serves the nodes' kubelet API (port-forward through the API server): a
        # PortForward object names where a pod's port really answers on this machine.
        self._start("kwok", [str(bins["kwok"] / "kwok"), f"--kubeconfig={self.kubeconfig}", "--manage-all-nodes=true",
                             "--node-lease-duration-seconds=40",  # the heartbeat the node controller reads
                             f"--config={f / 'kwok-stages.yaml'}", "--v=1", "--enable-crds=PortForward",
                             f"--server-address={self.host}:{kubelet}", f"--node-ip={self.host}",
                             f"--node-port={kubelet}", f"--tls-cert-file={f / 'apiserver.crt'}",
                             f"--tls-private-key-file={f / 'apiserver.key'}"])
        self.add_nodes(self.nodes)
        self.add_volumes(self.volumes)
        return self

    def _install_crds(self, names: list[str]) -> None:
        """kwok's own CRDs (from its module) that its --enable-crds watch."""
        import yaml
        from kubernetes import client

        folder = Path(_kwok_module()) / "kustomize" / "crd" / "bases"
        extensions = client.ApiextensionsV1Api(self.api())
        for name in names:
            extensions.create_custom_resource_definition(yaml.safe_load((folder / name).read_text()))

    def _ready(self, server: str) -> bool:
        import ssl

        import httpx

        tls = ssl.create_default_context(cafile=str(self.path / "ca.crt"))
        tls.load_cert_chain(self.path / "admin.crt", self.path / "admin.key")
        try:
            return httpx.get(f"{server}/readyz", verify=tls, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self):
        """A kubernetes.client.ApiClient for this cluster."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def add_nodes(self, count: int, first: int = 0) -> None:
        """`count` kwok nodes (kwok-node-<first>..), Ready once kwok takes them up."""
        from kubernetes import client

        core = client.CoreV1Api(self.api())
        for i in range(first, first + count):
            name = f"kwok-node-{i}"
            core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {
                "name": name, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                           "type": "kwok"}}, "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                                                        "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"}}})

        def all_ready() -> bool:
            ready = 0
            for node in core.list_node().items:
                ready += any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
            return ready >= first + count

        self._wait(f"{first + count} nodes Ready", all_ready)

    def add_volumes(self, count: int) -> None:
        """A default StorageClass and `count` PersistentVolumes of 10Gi in it, which the
        controller manager binds to claims, as a cluster's provisioner would (kwok runs no
        volume plugin: nothing is mounted)."""
        from kubernetes import client

        api = self.api()
        client.StorageV1Api(api).create_storage_class({
            "metadata": {"name": "standard", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate"})
        core = client.CoreV1Api(api)
        for i in range(count):
            core.create_persistent_volume({"metadata": {"name": f"volume-{i}"}, "spec": {
                "capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "standard",
                "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/nonexistent/volume-{i}"}}})

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def helm() -> Path:
    """The helm the kubernetes target runs (opsctl.targets.kubernetes.helm)."""
    from opsctl.targets.kubernetes import helm

    return helm.binary(cache())


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit(__doc__)
    for name, folder in build().items():
        print(f"{name}: {folder}")
    print(f"helm: {helm()}")
