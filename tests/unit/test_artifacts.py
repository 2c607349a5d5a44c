"""Programs built from their Go modules: names, link-time stamps, and the choice of helm."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from opsctl import artifacts
from opsctl.targets.kubernetes import helm


def test_a_program_is_named_after_its_package_not_its_major_version():
    assert artifacts.program_name("github.com/tsenart/vegeta/v12") == "vegeta"
    assert artifacts.program_name("k8s.io/kubernetes/cmd/kube-apiserver") == "kube-apiserver"


def fake_go(folder: Path) -> Path:
    """A `go` that records its arguments and writes each -o file as a script."""
    go = folder / "go"
    go.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n'
                  'while [ "$1" != "-o" ]; do shift; done\nprintf "#!/bin/sh\\necho v9.9.9\\n" > "$2"; chmod +x "$2"\n')
    go.chmod(0o755)
    return go


def test_each_program_is_built_with_its_stamp_into_one_folder_once(tmp_path, monkeypatch):
    fake_go(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    dest = tmp_path / "cache" / "kube-1"
    programs = {"kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver", "etcd": "go.etcd.io/etcd/server/v3"}
    stamp = {"k8s.io/component-base/version.gitVersion": "v1"}
    assert artifacts.go_binaries("kubernetes", programs, dest, stamp) == dest.resolve()
    assert sorted(p.name for p in dest.iterdir()) == ["etcd", "kube-apiserver"]
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2 and all("-X k8s.io/component-base/version.gitVersion=v1" in c for c in calls)
    artifacts.go_binaries("kubernetes", programs, dest)
    assert len((tmp_path / "calls").read_text().splitlines()) == 2  # cached: not built again


def test_helm_on_path_is_used_when_recent_enough(tmp_path, monkeypatch):
    on_path = tmp_path / "helm"
    on_path.write_text("#!/bin/sh\necho v3.14.2+g1234\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert helm.binary(tmp_path / "cache") == on_path


def test_an_old_helm_on_path_is_passed_over_for_the_built_one(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "helm").write_text("#!/bin/sh\necho v2.17.0\n")
    (bin_dir / "helm").chmod(0o755)
    fake_go(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    built = helm.binary(tmp_path / "cache")
    assert built == (tmp_path / "cache" / f"helm-{helm.VERSION}" / "helm").resolve()
    assert subprocess.run([str(built)], capture_output=True, text=True).stdout.strip() == "v9.9.9"
