"""Where the platform runs. A target brings a component to its desired state, stops it,
purges it, reports its health, and says where it answers (`address`): the one way anyone
learns where a component is. Components describe what they should be and never import
this package; the engine and the commands reach a target only through the run context
(`ctx.runtime`).

    targets/local/       supervised processes on this machine (the default)
    targets/kubernetes/  helm releases of the project's charts on a cluster

May import opsctl.spec, opsctl.net, opsctl.errors, opsctl.files, opsctl.host and the types
of opsctl.components.base; never a command.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opsctl.components.base import Health, Outcome, Server
    from opsctl.net import Address
    from opsctl.spec import Spec

IMPLEMENTATIONS = {"local": "opsctl.targets.local.target:LocalTarget",
                   "kubernetes": "opsctl.targets.kubernetes:KubernetesTarget"}


class Target:
    """What every target implements, for the components that run as servers (the others
    configure running systems through their APIs and need no target)."""

    name: str

    def __init__(self, state_dir: Path, options: dict | None = None):
        self.state_dir = state_dir
        self.options = options or {}

    def check_available(self) -> None:
        """Raise a UsageError saying what to do when this target cannot be used here."""

    def where(self) -> str:
        """Where it installs, in a few words, for install to say (empty: nothing to say)."""
        return ""

    def address(self, spec: Spec, name: str, port: str = "", colour: str | None = None) -> Address:
        """Where `name` answers on its port `port`; a service of both colours (and the
        colour's mesh, name "mesh") in `colour`."""
        raise NotImplementedError

    def reach(self, spec: Spec, name: str, port: str = "") -> Address:
        """Where opsctl, on this machine, reaches `name` on its port `port` (to configure it):
        where it answers, unless the target's network is not this machine's."""
        return self.address(spec, name, port)

    def credential(self, spec: Spec, component: str, key: str, dry_run: bool = False) -> str | None:
        """A generated credential that the target itself keeps (the kubernetes target: in the
        release's Secret; in a plan, one not made yet is "(to be generated)"); None: it keeps
        none, opsctl's own file does."""
        return None

    def private_dir(self) -> Path:
        """Where opsctl keeps what it holds of this target's platform (owner-only)."""
        return self.state_dir

    def apply(self, server: Server) -> Outcome:
        """Bring `server` to its desired state (a plan only, in a dry run)."""
        raise NotImplementedError

    def prepare(self, server: Server) -> None:
        """Fetch or build what `server` needs on this target into the cache, once (opsctl
        fetch); raise OpsError saying what is missing. Here: its program, as it checks."""
        server.check_installed()

    def health(self, server: Server) -> Health:
        raise NotImplementedError

    def stop(self, server: Server) -> bool:
        """Stop it; True if it was running."""
        raise NotImplementedError

    def purge(self, server: Server) -> None:
        """Delete its data, logs and state."""
        raise NotImplementedError

    def running(self, server: Server) -> bool:
        raise NotImplementedError

    def logfile(self, server: Server) -> Path:
        raise NotImplementedError

    def read_record(self, spec: Spec, key: str) -> dict | None:
        """One of opsctl's records as this target keeps it ("live": which colour is live;
        "images": what each colour runs), None if it keeps none (the local target keeps its
        records in Consul and .opsctl: opsctl.components.live, builds)."""
        return None

    def keep_record(self, spec: Spec, key: str, record: dict) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Once everything is stopped: stop what runs the servers (the local supervisor)."""


def get(name: str, state_dir: Path, options: dict | None = None) -> Target:
    module, _, cls = IMPLEMENTATIONS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(state_dir, options)
