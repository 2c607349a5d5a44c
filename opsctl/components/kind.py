"""Step 1 on the kubernetes target: the cluster. Where Docker is installed and neither
--context nor --kubeconfig is given, opsctl makes its own kind cluster from
manifests/kind/cluster.yaml (one control plane, three workers), named after the platform,
its kubeconfig in the state folder; `down --purge` deletes it. Otherwise the step uses the
given (or current) context's cluster, and says which. kind is the one on PATH, else built
from its Go module (opsctl/builds/kind) into the cache the first time.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from opsctl.components.base import Component, Outcome
from opsctl.errors import OpsError

VERSION = "0.33.0"  # as pinned in opsctl/builds/kind/go.mod
CONFIG = Path(__file__).resolve().parents[2] / "manifests" / "kind" / "cluster.yaml"
CREATE_TIMEOUT = 600  # seconds: the node image's first pull is most of it


def binary(cache: Path) -> str:
    from opsctl import artifacts

    return shutil.which("kind") or str(artifacts.go_binary("kind", "sigs.k8s.io/kind", cache / f"kind-{VERSION}"))


def create_args(name: str, kubeconfig: Path) -> list[str]:
    return ["create", "cluster", "--name", name, "--config", str(CONFIG), "--kubeconfig", str(kubeconfig),
            "--wait", "5m"]


class Kind(Component):
    on_kubernetes = True

    def _kind(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([binary(self.ctx.cache_dir), *args], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise OpsError(f"kind {args[0]} {args[1]} did not finish in {timeout:.0f} s",
                           "check that Docker runs (`docker info`), then run again") from None

    def _exists(self, name: str) -> bool:
        listed = self._kind("get", "clusters")
        if listed.returncode != 0:
            raise OpsError(f"kind cannot list its clusters: {listed.stderr.strip()[-300:]}",
                           "check that Docker runs and that you may use it (`docker info`)")
        return name in listed.stdout.split()

    def check_installed(self) -> None:
        """kind itself, where opsctl will make a cluster with it."""
        if self.ctx.runtime.kind_cluster:
            binary(self.ctx.cache_dir)

    def reconcile(self) -> Outcome:
        runtime = self.ctx.runtime
        name = runtime.kind_cluster
        if name is None:
            return Outcome("skipped", f"using {runtime.where()}")
        if self._exists(name) and runtime.cluster_exists():
            return Outcome("unchanged", f"kind cluster {name} (context kind-{name})")
        if self.ctx.dry_run:
            return Outcome("planned", f"create kind cluster {name} (1 control plane, 3 workers)")
        kubeconfig = runtime.kind_kubeconfig
        kubeconfig.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        existed = self._exists(name)
        if existed:  # made by kind, its kubeconfig lost: write it again
            done = self._kind("export", "kubeconfig", "--name", name, "--kubeconfig", str(kubeconfig))
        else:
            done = self._kind(*create_args(name, kubeconfig), timeout=CREATE_TIMEOUT)
        if done.returncode != 0:
            raise OpsError(f"kind could not {'export' if existed else 'create'} the cluster {name}: "
                           f"{done.stderr.strip()[-400:]}",
                           f"see `docker ps -a`; `kind delete cluster --name {name}` and run install again")
        kubeconfig.chmod(0o600)
        done_what = "wrote the kubeconfig of" if existed else "created"
        return Outcome("changed", f"{done_what} kind cluster {name} (context kind-{name}, kubeconfig {kubeconfig})")

    def health(self):
        runtime = self.ctx.runtime
        if runtime.kind_cluster is None:
            return self._health("n/a", detail=f"using {runtime.where()}")
        if not runtime.cluster_exists():
            return self._health("unhealthy", detail=f"kind cluster {runtime.kind_cluster} not created yet")
        return self._health("healthy", endpoint=f"context kind-{runtime.kind_cluster}")

    def purge(self) -> None:
        """Deletes opsctl's own kind cluster, and its kubeconfig."""
        runtime = self.ctx.runtime
        if runtime.kind_cluster and runtime.cluster_exists():
            self._kind("delete", "cluster", "--name", runtime.kind_cluster, timeout=300)
            runtime.kind_kubeconfig.unlink(missing_ok=True)
