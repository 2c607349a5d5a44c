"""`opsctl images build` with the builder there is. No Docker engine and no buildah run here:
stand-ins record what they are asked (the Dockerfile itself is test_service_images.py's)."""

from __future__ import annotations

import importlib.metadata
import stat
from pathlib import Path

import pytest

from opsctl import spec
from opsctl.app import images
from opsctl.context import Context
from opsctl.errors import OpsError

VERSION = importlib.metadata.version("order-services")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """An empty PATH but for the stand-ins a test adds: tool(name, engine=True)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))

    def tool(name: str, engine: bool = True) -> None:
        path = bin_dir / name
        answer = "exit 0" if engine else "exit 1"
        path.write_text(f'#!/bin/sh\nif [ "$1" = version ]; then {answer}; fi\necho "{name} $*" >> {calls}\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    tool.calls = lambda: calls.read_text().splitlines() if calls.exists() else []
    return tool


def ctx(folder: Path, **options) -> Context:
    return Context(spec.load(None), "kubernetes", folder / ".opsctl", False, {"context": "elsewhere", **options})


def test_docker_builds_the_one_image_tagged_with_the_services_version_and_pushes_it(machine, tmp_path):
    machine("docker")
    built = images.build(ctx(tmp_path), None, True, None).data
    ref = f"opsctl/order-services:{VERSION}"
    assert built == {"image": ref, "builder": "docker", "pushed": True, "loaded_into_kind": None}
    assert machine.calls() == [f"docker build -f {images.DOCKERFILE} -t {ref} {images.SERVICES}", f"docker push {ref}"]


def test_buildah_builds_where_docker_has_no_engine_and_neither_says_so(machine, tmp_path):
    machine("docker", engine=False)
    with pytest.raises(OpsError, match=r"docker: its engine does not answer; buildah: not installed") as no_builder:
        images.build(ctx(tmp_path), None, False, None)
    assert "apt-get install -y buildah" in no_builder.value.hint
    machine("buildah")
    assert images.build(ctx(tmp_path), "registry.example.org/os:2", False, None).data["builder"] == "buildah"
    assert machine.calls() == [f"buildah build -f {images.DOCKERFILE} -t registry.example.org/os:2 {images.SERVICES}"]


def test_opsctls_kind_cluster_gets_the_image_without_a_registry(machine, tmp_path):
    machine("docker")
    machine("kind")
    kubeconfig = tmp_path / ".opsctl" / "kind" / "kubeconfig"
    kubeconfig.parent.mkdir(parents=True)
    kubeconfig.write_text("apiVersion: v1\n")
    kind_ctx = Context(spec.load(None), "kubernetes", tmp_path / ".opsctl", False, {"kind_name": "shop"})
    assert images.build(kind_ctx, None, False, None).data["loaded_into_kind"] == "shop"
    assert machine.calls()[-1] == f"kind load docker-image opsctl/order-services:{VERSION} --name shop"
