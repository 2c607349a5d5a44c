"""helm, the program the kubernetes target drives releases with: the one on PATH when it is
helm 3.8 or newer, else the one built from its Go module (opsctl/builds/helm) into the
cache, once."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from opsctl.errors import OpsError

VERSION = "4.3.2"  # as pinned in opsctl/builds/helm/go.mod
PACKAGE = "helm.sh/helm/v4/cmd/helm"
OLDEST = (3, 8)  # OCI charts and --wait on every kind of workload


def _version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([binary, "version", "--short"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.match(r"v?(\d+)\.(\d+)", out.strip())
    return (int(found[1]), int(found[2])) if found else None


def binary(cache_dir: Path) -> Path:
    """The helm to run: PATH's if recent enough, else the cache's (built the first time:
    about 3 minutes of CPU)."""
    from opsctl import artifacts

    on_path = shutil.which("helm")
    if on_path and (_version(on_path) or (0, 0)) >= OLDEST:
        return Path(on_path)
    built = artifacts.go_binary("helm", PACKAGE, cache_dir / f"helm-{VERSION}",
                                stamp={"helm.sh/helm/v4/internal/version.version": f"v{VERSION}"})
    if not _version(str(built)):
        raise OpsError(f"{built} does not run", f"delete {built.parent} and run `opsctl fetch` again")
    return built
