"""The cluster add-ons' upstream charts (platform.yaml `components.<name>.chart`), fetched
once into the cache: <cache>/charts/<chart>-<version>/.

First from its chart repository (`helm pull`). Chart repositories are not reachable from
every machine (not from this project's CI): where the chart's source is a Go module, it then
comes from the Go module proxy ($GOPROXY, as the Go toolchain reads it) and is assembled as
the project's release tooling does: Chart.yaml from Chart.template.yaml with the version, its
CRD templates copied into templates/. A chart that cannot be had says why, and the step fails
with that reason.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from opsctl.errors import OpsError
from opsctl.spec import UpstreamChart

DEFAULT_PROXY = "https://proxy.golang.org"  # the Go toolchain's default
TIMEOUT = 120  # seconds for the module's download


def proxy() -> str:
    """The first proxy of $GOPROXY that is one (not `direct` or `off`)."""
    for entry in re.split(r"[,|]", os.environ.get("GOPROXY") or DEFAULT_PROXY):
        if entry.startswith(("https://", "http://", "file://")):
            return entry.rstrip("/")
    return DEFAULT_PROXY


def _escaped(module: str) -> str:
    """The module proxy protocol's case encoding: an upper-case letter is ! and its lower case."""
    return re.sub(r"[A-Z]", lambda m: "!" + m.group().lower(), module)


def _unavailable(chart: UpstreamChart, why: str) -> OpsError:
    return OpsError(f"the chart {chart.name} {chart.version} cannot be fetched: {why}",
                    f"where {chart.repository} is reachable, `helm pull {chart.name.split('/')[1]} --repo "
                    f"{chart.repository} --version {chart.version} --untar` and put the chart's folder here as "
                    f"<download cache>/charts/{_folder(chart)}; or install the add-on yourself")


def _folder(chart: UpstreamChart) -> str:
    return f"{chart.name.replace('/', '-')}-{chart.version}"


def fetch(chart: UpstreamChart, cache: Path, helm: Callable) -> Path:
    """The chart's folder, fetched and assembled the first time. `helm(*args)` runs helm."""
    home = cache / "charts" / _folder(chart)
    if (home / "Chart.yaml").is_file():
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{home.name}.", dir=home.parent))
    try:
        pulled = helm("pull", chart.name.split("/")[1], "--repo", chart.repository, "--version", chart.version,
                      "--untar", "--untardir", str(scratch), timeout=TIMEOUT)
        if pulled.returncode == 0:
            (scratch / chart.name.split("/")[1]).rename(home)
            return home
        why = f"{chart.repository} does not answer ({pulled.stderr.strip().splitlines()[-1][:160]})"
        if not chart.module:
            raise _unavailable(chart, why + ", and the chart is on no registry this machine reaches")
        _from_module(chart, scratch, why)
        scratch.rename(home)  # whole or not at all
    except FileExistsError:
        pass  # another run got it meanwhile
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return home


def _from_module(chart: UpstreamChart, into: Path, why: str) -> None:
    import httpx

    version = chart.module_version or chart.version
    url = f"{proxy()}/{_escaped(chart.module)}/@v/{version}.zip"
    try:
        answer = httpx.get(url, timeout=TIMEOUT, follow_redirects=True)
    except httpx.HTTPError as e:
        raise _unavailable(chart, f"{why}, and the Go module proxy does not answer ({e})") from None
    if answer.status_code != 200:
        raise _unavailable(chart, f"{why}, and the Go module proxy has no {chart.module}@{version} "
                                  f"(HTTP {answer.status_code})")
    _assemble(chart, zipfile.ZipFile(io.BytesIO(answer.content)), f"{chart.module}@{version}/", into)


def _assemble(chart: UpstreamChart, archive: zipfile.ZipFile, root: str, into: Path) -> None:
    import yaml

    def extract(folder: str, to: Path) -> int:
        prefix = root + folder.strip("./") + "/" if folder.strip("./") else root
        count = 0
        for member in archive.infolist():
            if member.filename.startswith(prefix) and not member.is_dir():
                relative = member.filename[len(prefix):]
                if ".." in Path(relative).parts:
                    continue
                target = to / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
                count += 1
        return count

    if not extract(chart.path, into):
        raise _unavailable(chart, f"{chart.module} has no folder {chart.path}")
    template = into / "Chart.template.yaml"
    if template.exists() and not (into / "Chart.yaml").exists():
        meta = yaml.safe_load(template.read_text())
        meta.update(version=chart.version, appVersion=chart.version)
        (into / "Chart.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        template.unlink()
    if chart.crds:
        extract(chart.crds, into / "templates")
        (into / "templates" / "README.md").unlink(missing_ok=True)
    meta = yaml.safe_load((into / "Chart.yaml").read_text()) if (into / "Chart.yaml").exists() else None
    if not meta:
        raise _unavailable(chart, f"{chart.path} of {chart.module} is not a chart (no Chart.yaml)")
    if str(meta.get("version")).lstrip("v") != chart.version.lstrip("v"):
        raise _unavailable(chart, f"{chart.module}@{chart.module_version or chart.version} holds version "
                                  f"{meta.get('version')} of the chart")
    missing = [d["name"] for d in meta.get("dependencies") or []
               if not (into / "charts" / d["name"]).is_dir() and not list((into / "charts").glob(f"{d['name']}-*.tgz"))]
    if missing:
        raise _unavailable(chart, f"its dependencies {', '.join(missing)} are not vendored in {chart.path} of "
                                  f"{chart.module} (helm dependency build fetches them from chart repositories)")
