"""Artifacts fetched once into the cache folder: jars and distributions from Maven Central
(with Maven), and programs built from their Go modules (with the Go toolchain; each build's
wrapper module, its go.mod and go.sum, is under opsctl/builds/).

Each artifact lands in a temporary folder that is renamed into place when complete, so
an interrupted download is never mistaken for a finished one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from opsctl.errors import OpsError
from opsctl.host import require_binary

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>opsctl.local</groupId><artifactId>runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{deps}
  </dependencies>
</project>
"""
DEP = "    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"


def _mvn(args: list[str], cwd: Path, what: str) -> None:
    mvn = require_binary("mvn", "apt-get install -y maven")
    require_binary("java", "apt-get install -y openjdk-17-jre-headless")
    result = subprocess.run([mvn, "-B", "-q", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
        raise OpsError(f"Maven could not fetch {what}:\n{tail}",
                       "check that Maven Central is reachable, then run again")


def _install(dest: Path, fill) -> Path:
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        fill(tmp)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def jars(coordinates: list[str], dest: Path) -> Path:
    """All runtime jars of `group:artifact:version` coordinates, in dest/."""

    def fill(tmp: Path) -> None:
        deps = "\n".join(DEP.format(g=g, a=a, v=v) for g, a, v in (c.split(":") for c in coordinates))
        (tmp / "pom.xml").write_text(POM.format(deps=deps))
        _mvn(["dependency:copy-dependencies", "-DincludeScope=runtime", "-DoutputDirectory=libs"],
             tmp, ", ".join(coordinates))
        (tmp / "pom.xml").unlink()

    return _install(dest, fill)


def unzipped(coordinate: str, dest: Path) -> Path:
    """A zip distribution `group:artifact:version`, unpacked into dest/ (its top folder stripped)."""

    def fill(tmp: Path) -> None:
        _mvn(["dependency:copy", f"-Dartifact={coordinate}:zip", "-DoutputDirectory=."], tmp, coordinate)
        archive = next(tmp.glob("*.zip"))
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                parts = Path(info.filename).parts[1:]
                if not parts:
                    continue
                target = tmp.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                target.chmod((info.external_attr >> 16) & 0o777 or 0o644)
        archive.unlink()

    return _install(dest, fill)


BUILDS = Path(__file__).with_name("builds")  # the wrapper modules: one folder per program


def go_binary(build: str, package: str, dest: Path, stamp: dict[str, str] | None = None) -> Path:
    """The program `package` built from the wrapper module opsctl/builds/<build>, as
    dest/<its name> (see go_binaries)."""
    name = program_name(package)
    return go_binaries(build, {name: package}, dest, stamp) / name


def program_name(package: str) -> str:
    parts = package.rstrip("/").split("/")
    return parts[-2] if re.fullmatch(r"v[0-9]+", parts[-1]) else parts[-1]  # .../vegeta/v12: vegeta


def go_binaries(build: str, programs: dict[str, str], dest: Path, stamp: dict[str, str] | None = None) -> Path:
    """The programs (name: package) built from the wrapper module opsctl/builds/<build> (its
    go.sum pins every module) into dest/; `stamp` sets string variables at link time
    (package.Var: value), as the programs' own release builds set their version. Minutes of
    CPU the first time (Consul: ~5 on 2 cores; the Kubernetes control plane: ~20); the
    module zips come from the Go module proxy."""
    go = require_binary("go", "install Go 1.22 or newer (https://go.dev/dl/, or apt-get install -y golang)")
    ldflags = " ".join(["-s", "-w", *(f"-X {var}={value}" for var, value in (stamp or {}).items())])
    dest = dest.resolve()  # go runs in the wrapper module's folder

    def fill(tmp: Path) -> None:
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false",
               "CGO_ENABLED": "0"}
        for name, package in programs.items():  # one at a time: building several at once needs all their memory
            result = subprocess.run([go, "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(tmp / name), package],
                                    cwd=BUILDS / build, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
                raise OpsError(f"go build {package} failed:\n{tail}",
                               "check that the Go module proxy is reachable (GOPROXY), then run again")

    return _install(dest, fill)
