"""The kubernetes target: helm releases and manifests applied to a kube context. Not
available yet: every operation says so, through the same interface as the local target,
so that filling it in changes nothing else."""

from __future__ import annotations

from opsctl.errors import UsageError
from opsctl.targets import Target


def not_available() -> UsageError:
    return UsageError("the kubernetes target is not available yet in this version of opsctl",
                      "use --target local (the default) for now")


class KubernetesTarget(Target):
    name = "kubernetes"

    def check_available(self) -> None:
        raise not_available()

    def _not_yet(self, *args, **kwargs):
        raise not_available()

    address = apply = health = stop = purge = running = logfile = _not_yet
