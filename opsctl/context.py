"""The run context: the spec, the target and the state folder of one opsctl run, shared by
the engine, the components and the targets. Imports no component and no target module at
load time (the target is looked up when first used)."""

from __future__ import annotations

import os
import secrets as pysecrets
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from opsctl.files import read_json, write_json_atomic
from opsctl.net import Address
from opsctl.spec import Spec

if TYPE_CHECKING:
    from opsctl.targets import Target


@dataclass
class Context:
    """Everything a step needs to know about this run."""

    spec: Spec
    target: str
    state_dir: Path
    dry_run: bool = False
    target_options: dict = field(default_factory=dict)  # the kubernetes target's --context, --kubeconfig
    cancel: threading.Event = field(default_factory=threading.Event)
    _secrets_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host(self) -> str:
        return self.spec.platform.bind_address

    @cached_property
    def runtime(self) -> Target:
        """The target the platform runs on (opsctl.targets): it runs the components."""
        from opsctl import targets

        return targets.get(self.target, self.state_dir, self.target_options)

    def address(self, name: str, port: str = "", colour: str | None = None) -> Address:
        """Where component or service `name` answers on its port `port` (else its first),
        in `colour` for what runs in each, as the target says: the one way to learn it."""
        return self.runtime.address(self.spec, name, port, colour)

    def reach(self, name: str, port: str = "") -> Address:
        """Where opsctl itself reaches `name` on its port `port` to configure it: its address,
        or (on a cluster) a local port-forward to it."""
        return self.runtime.reach(self.spec, name, port)

    def opsctl(self, command: str) -> str:
        """`opsctl COMMAND` as a hint to run on this run's target."""
        return f"opsctl {command}" + ("" if self.target == "local" else f" --target {self.target}")

    @property
    def cache_dir(self) -> Path:
        """Downloaded artifacts (Maven); shared between working directories via $OPSCTL_CACHE_DIR."""
        env = os.environ.get("OPSCTL_CACHE_DIR")
        return Path(env).resolve() if env else self.state_dir / "cache"

    @property
    def target_dir(self) -> Path:
        """Where opsctl keeps what it holds of the platform on its target (Vault's init record,
        its admin token): the state folder, or a folder per cluster."""
        return self.runtime.private_dir()

    def local_dir(self, component: str) -> Path:
        return self.state_dir / "local" / component

    @property
    def secrets_file(self) -> Path:
        return self.state_dir / "secrets.json"

    def secret(self, component: str, key: str, generate=lambda: pysecrets.token_urlsafe(24)) -> str:
        """A generated credential: the target's own (a release's Secret on a cluster), else
        kept in a 0600 file until Vault holds the services' ones."""
        held = self.runtime.credential(self.spec, component, key, self.dry_run)
        if held is not None:
            return held
        with self._secrets_lock:
            data = read_json(self.secrets_file, default={}) or {}
            value = data.get(component, {}).get(key)
            if value is None and self.dry_run:
                return "(to be generated)"  # a plan writes nothing
            if value is None:
                value = generate()
                data.setdefault(component, {})[key] = value
                write_json_atomic(self.secrets_file, data, mode=0o600)
            return value
