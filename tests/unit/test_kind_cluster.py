"""Steps 1 and 2 on a machine with Docker (there is none here): opsctl's own kind cluster
when no context is given, and MetalLB's pool from the cluster's docker network. kind and
docker are stand-ins that answer as they do; the real cluster is kind's to make."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from opsctl import spec
from opsctl.components import build
from opsctl.components.metallb import pool
from opsctl.context import Context
from opsctl.errors import OpsError, UsageError


def test_the_pool_is_the_top_of_each_ipv4_subnet_of_the_docker_network():
    assert pool(["fc00:f853:ccd:e793::/64", "172.18.0.0/16"]) == ["172.18.255.200-172.18.255.250"]
    assert pool(["192.168.49.0/24"]) == ["192.168.49.200-192.168.49.250"]
    with pytest.raises(OpsError, match="too small"):
        pool(["10.0.0.0/28"])
    with pytest.raises(OpsError, match="no IPv4 subnet"):
        pool(["fc00::/64"])


def stand_in(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def docker_machine(tmp_path, monkeypatch):
    """PATH with a `docker` and a `kind` that keeps its clusters in a file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "docker", "exit 0\n")
    clusters = tmp_path / "clusters"
    stand_in(bin_dir, "kind", f"""
case "$1 $2" in
  "get clusters") cat {clusters} 2>/dev/null || true ;;
  "create cluster") [ "$5" = --config ] && [ -f "$6" ] && [ "$7" = --kubeconfig ] || exit 3
                    echo "$4" >> {clusters}; printf 'apiVersion: v1\\nkind: Config\\n' > "$8" ;;
  "delete cluster") : > {clusters} ;;
  *) exit 2 ;;
esac
""")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def kube_ctx(folder: Path, dry_run: bool = False, **options) -> Context:
    return Context(spec.load(None), "kubernetes", folder / ".opsctl", dry_run, {"kind_name": "Order Platform", **options})


def test_without_a_context_opsctl_makes_its_own_kind_cluster_once(docker_machine):
    planned = build("kind", kube_ctx(docker_machine, dry_run=True)).reconcile()
    assert (planned.state, planned.detail) == ("planned", "create kind cluster order-platform (1 control plane, 3 workers)")
    ctx = kube_ctx(docker_machine)
    assert "which step 1 makes" in ctx.runtime.where()
    with pytest.raises(UsageError, match="no kind cluster order-platform yet"):
        ctx.runtime.kubeconfig  # a command before install says what to do
    made = build("kind", ctx).reconcile()
    kubeconfig = docker_machine / ".opsctl" / "kind" / "kubeconfig"
    assert made.state == "changed" and str(kubeconfig) in made.detail
    assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
    assert stat.S_IMODE(kubeconfig.parent.stat().st_mode) == 0o700
    assert build("kind", kube_ctx(docker_machine)).reconcile().state == "unchanged"
    again = kube_ctx(docker_machine)
    assert (again.runtime.kubeconfig, again.runtime.kube_context) == (kubeconfig, "kind-order-platform")
    build("kind", again).purge()
    assert not kubeconfig.exists() and (docker_machine / "clusters").read_text() == ""


def test_a_given_context_is_used_and_said(docker_machine):
    kubeconfig = docker_machine / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {}}], "contexts": [{"name": "production", "context": {"cluster": "c", "user": "u"}}]}))
    ctx = kube_ctx(docker_machine, context="production", kubeconfig=str(kubeconfig))
    assert ctx.runtime.kind_cluster is None
    used = build("kind", ctx).reconcile()
    assert used.state == "skipped" and used.detail.startswith("using the cluster of context production")
    assert not (docker_machine / "clusters").exists()  # no cluster made
