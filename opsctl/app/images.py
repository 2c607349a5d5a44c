"""`opsctl images build`: the one image of the kubernetes target's services and streaming
job (services/images/order-services/Dockerfile, built from services/), with docker or
buildah, whichever is installed (or --builder). Tagged kubernetes.services_image:<services
version> unless --image names another; --push sends it to its registry; where opsctl's own
kind cluster runs, the image is loaded into its nodes, so the cluster needs no registry.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from opsctl.app import Result
from opsctl.components.service_releases import image as default_image
from opsctl.context import Context
from opsctl.errors import OpsError, UsageError
from opsctl.host import docker_engine
from opsctl.spec import IMAGE_REFERENCE

SERVICES = Path(__file__).resolve().parents[2] / "services"
DOCKERFILE = SERVICES / "images" / "order-services" / "Dockerfile"
BUILDERS = ("docker", "buildah")
INSTALL = ("install Docker Engine (https://docs.docker.com/engine/install/) or buildah (apt-get install -y buildah), "
           f"or build {DOCKERFILE.relative_to(SERVICES.parent)} (context services/) where one is")


def builder(chosen: str | None) -> str:
    """The builder's program: the one chosen, else the first of BUILDERS that can build here
    (docker only with its engine running)."""
    why = []
    for name in [chosen] if chosen else BUILDERS:
        found = docker_engine() if name == "docker" else shutil.which(name)
        if found:
            return found
        why.append(f"{name}: its engine does not answer" if name == "docker" and shutil.which("docker")
                   else f"{name}: not installed")
    raise OpsError(f"the image cannot be built on this machine ({'; '.join(why)})", INSTALL)


def _run(argv: list[str], what: str) -> None:
    """A builder's step, its output shown as it goes (on stderr: stdout stays the result's)."""
    done = subprocess.run(argv, stdout=sys.stderr, stderr=sys.stderr, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise OpsError(f"{what} failed (exit {done.returncode}): see its output above",
                       "fix what it says, then run again")


def build(ctx: Context, image: str | None, push: bool, chosen: str | None) -> Result:
    ref = image or default_image(ctx)
    if not re.fullmatch(IMAGE_REFERENCE, ref):
        raise UsageError(f"{ref!r} is not an image reference with a tag or digest",
                         "name it as REPOSITORY:TAG, e.g. registry.example.com/order-services:1.4.0")
    tool = builder(chosen)
    name = Path(tool).name
    _run([tool, "build", "-f", str(DOCKERFILE), "-t", ref, str(SERVICES)], f"{name} build")
    if push:
        _run([tool, "push", ref], f"{name} push")
    loaded = None
    runtime = ctx.runtime
    if name == "docker" and runtime.kind_cluster and runtime.cluster_exists():
        from opsctl.components.kind import binary

        _run([binary(ctx.cache_dir), "load", "docker-image", ref, "--name", runtime.kind_cluster], "kind load")
        loaded = runtime.kind_cluster
    return Result({"image": ref, "builder": name, "pushed": push, "loaded_into_kind": loaded})
