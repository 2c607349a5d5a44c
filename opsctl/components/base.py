"""What every component module implements, and the shared machinery of local servers."""

from __future__ import annotations

import hashlib
import json
import os
import secrets as pysecrets
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from opsctl.errors import OpsError
from opsctl.files import read_json, write_atomic, write_json_atomic
from opsctl.net import Address
from opsctl.spec import Component as ComponentSpec, Spec
from opsctl.targets.local.process import Process, chown_tree, port_free, system_user


@dataclass
class Context:
    """Everything a step needs to know about this run."""

    spec: Spec
    target: str
    state_dir: Path
    dry_run: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    _secrets_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def host(self) -> str:
        return self.spec.platform.bind_address

    def address(self, name: str, port: str = "") -> Address:
        """Where component or service `name` answers on its port `port` (else its first):
        the one way to learn it."""
        entry = self.spec.components.get(name) or self.spec.services.get(name)
        if entry is None or not entry.ports or (port and port not in entry.ports):
            raise KeyError(f"{name} has no port {port!r}")
        return Address(self.host, entry.ports[port] if port else next(iter(entry.ports.values())))

    @property
    def cache_dir(self) -> Path:
        """Downloaded artifacts (Maven); shared between working directories via $OPSCTL_CACHE_DIR."""
        env = os.environ.get("OPSCTL_CACHE_DIR")
        return Path(env).resolve() if env else self.state_dir / "cache"

    def local_dir(self, component: str) -> Path:
        return self.state_dir / "local" / component

    @property
    def secrets_file(self) -> Path:
        return self.state_dir / "secrets.json"

    def secret(self, component: str, key: str, generate=lambda: pysecrets.token_urlsafe(24)) -> str:
        """A generated credential, kept in a 0600 file until Vault holds the services' ones."""
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


@dataclass
class Outcome:
    state: str  # planned | unchanged | changed | skipped | failed | interrupted
    detail: str = ""


@dataclass
class Health:
    component: str
    step: int
    target: str
    health: str  # healthy | unhealthy | stopped | n/a
    endpoint: str = ""
    version: str = ""
    detail: str = ""
    restarts: int = 0      # unexpected exits the supervisor restarted since opsctl started it
    last_error: str = ""   # why it last ended, with the last lines of its log

    @property
    def ok(self) -> bool:
        return self.health in ("healthy", "n/a")


class Component:
    """A component reconciles itself from the spec and reports its health."""

    after: tuple[str, ...] = ()  # components that must be reconciled first

    def __init__(self, name: str, ctx: Context):
        self.name = name
        self.ctx = ctx
        self.spec: ComponentSpec | None = self._component_spec()

    def _component_spec(self) -> ComponentSpec | None:
        return self.ctx.spec.components[self.name]

    @property
    def number(self) -> int:
        from opsctl.registry import step_number

        return self.spec.step if self.spec else step_number(self.ctx.spec, self.name)

    def reconcile(self) -> Outcome:
        raise NotImplementedError

    def health(self) -> Health:
        raise NotImplementedError

    def stop(self) -> bool:
        return False

    def purge(self) -> None:
        """Delete what this component keeps outside the state folder (most keep nothing)."""

    def _health(self, health: str, **kw) -> Health:
        return Health(self.name, self.number, self.ctx.target, health, **kw)


class Skipped(Component):
    """A step with no meaning on this target, or one that has not landed yet."""

    def __init__(self, name: str, ctx: Context, reason: str):
        super().__init__(name, ctx)
        self.reason = reason

    def reconcile(self) -> Outcome:
        return Outcome("skipped", self.reason)

    def health(self) -> Health:
        return self._health("n/a", detail=self.reason)


@dataclass
class Change:
    """One difference between the spec and a running system, and how to remove it."""

    action: str  # create | update
    target: str  # what, e.g. "client create-orders-client"
    detail: str = ""
    apply: Callable[[], None] = field(default=lambda: None, repr=False)

    def __str__(self) -> str:
        return f"{self.action} {self.target}" + (f" ({self.detail})" if self.detail else "")


class ConfigStep(Component):
    """A step that configures running systems (a realm, Vault's auth, users).

    `plan()` yields the changes one by one; apply runs each as it is yielded, so a later
    check sees what an earlier change created. In a dry run nothing is applied, and the
    checks must treat what does not exist yet as to be created.
    """

    def _component_spec(self) -> None:
        return None  # configuration steps are numbered after the components (opsctl.registry)

    def plan(self) -> Iterator[Change]:
        raise NotImplementedError

    def changes(self, apply: bool) -> list[Change]:
        done = []
        for change in self.plan():
            if apply:
                change.apply()
            done.append(change)
        return done

    def reconcile(self) -> Outcome:
        changes = self.changes(apply=not self.ctx.dry_run)
        if not changes:
            return Outcome("unchanged", "in sync")
        shown = "; ".join(str(c) for c in changes[:3]) + (" …" if len(changes) > 3 else "")
        return Outcome("planned" if self.ctx.dry_run else "changed", f"{len(changes)} change(s): {shown}")


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LocalServer(Component):
    """A real server started as a process on the bind address.

    Subclasses describe the server (files, command, probe, version); this class makes it
    so: writes the files, initialises data once, starts, waits until ready, and restarts
    only when the configuration changed.
    """

    ready_timeout = 60.0
    stop_signal = signal.SIGTERM
    stop_timeout = 60.0
    stop_group = True  # the stop signal goes to every process of the server, not only its leader
    run_as: str | None = None  # system user for servers that refuse to run as root
    stopped_health = "stopped"          # what a server stopped on purpose counts as (exit 3)
    never_started_health = "unhealthy"  # and one never installed here

    def __init__(self, name: str, ctx: Context):
        super().__init__(name, ctx)
        self.home = ctx.local_dir(name)
        self.process = Process(name, self.home)
        self.user = system_user(self.run_as)

    # --- what a subclass describes -------------------------------------------------
    def check_installed(self) -> None:
        """Raise OpsError naming the install command when a binary or artifact is missing."""

    def config_files(self) -> dict[str, str]:
        """Files (relative to the component folder) rendered from the spec."""
        return {}

    def initialise(self) -> None:
        """One-time set-up of the data folder; must be idempotent and crash-safe."""

    def before_start(self) -> None:
        """Start helpers the server needs (RabbitMQ's epmd)."""

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def probe(self) -> bool:
        """Cheap readiness check against the running server."""
        raise NotImplementedError

    def converge(self) -> str | None:
        """Bring a ready server to the desired state (unseal, users…); say what changed."""
        return None

    def endpoint(self) -> str:
        return str(self.ctx.address(self.name))

    def version(self) -> str:
        return ""

    def health_detail(self) -> tuple[bool, str]:
        """(healthy, detail) of a ready server; override for richer checks."""
        return True, ""

    # --- the machinery ---------------------------------------------------------------
    def port(self, key: str) -> int:
        return self.spec.ports[key]

    def address(self, port: str = "") -> Address:
        return self.ctx.address(self.name, port)

    def path(self, *parts: str) -> Path:
        return self.home.joinpath(*parts)

    def _fingerprint(self) -> str:
        return fingerprint(self.argv(), self.env(), self.config_files())

    def port_setting(self, key: str) -> str:
        """Where opsctl.yaml sets this port (shown when the port is taken)."""
        return f"components:\n    {self.name}:\n      ports: {{{key}: <free port>}}"

    def _check_ports(self) -> None:
        for key, port in self.spec.ports.items():
            if not port_free(self.ctx.host, port):
                raise OpsError(
                    f"{self.name} cannot listen on {self.ctx.host}:{port} ({key} port): "
                    "another process is using it",
                    f"stop that process, or pick another port in opsctl.yaml:\n  {self.port_setting(key)}",
                )

    def reconcile(self) -> Outcome:
        self.check_installed()
        running = self.process.running()
        wanted = self._fingerprint()
        if running and self.process.fingerprint != wanted:
            action = "restart: configuration changed"
        elif running:
            action = None
        else:
            action = "start"
        if self.ctx.dry_run:
            return Outcome("planned", action) if action else Outcome("unchanged", self.endpoint())
        changed = []
        if action:
            self.stop()  # a running one, or one supervisord is still stopping or restarting
            self._check_ports()
            self.home.mkdir(parents=True, exist_ok=True)
            for rel, content in self.config_files().items():
                write_atomic(self.path(rel), content, mode=0o600)
            self.initialise()
            chown_tree(self.home, self.user)
            self.before_start()
            self.process.start(self.argv(), self.env(), wanted, user=self.user,
                               stop_signal=self.stop_signal, stop_timeout=self.stop_timeout,
                               stop_group=self.stop_group)
            changed.append("started" if action == "start" else "restarted")
        self.process.wait_ready(self.probe, self.ready_timeout, self.ctx.cancel)
        converged = self.converge()
        if converged:
            changed.append(converged)
        if not changed:
            return Outcome("unchanged", self.endpoint())
        return Outcome("changed", f"{', '.join(changed)}: {self.endpoint()}")

    def health(self) -> Health:
        endpoint = self.endpoint()
        supervision = self.process.supervision()
        restarts, error = supervision["restarts"], supervision["last_error"]
        if error and supervision["log_tail"]:
            error = f"{error}\n{supervision['log_tail']}"
        if supervision["state"] not in ("running", "starting"):
            if not self.home.exists():
                never = self.never_started_health
                return self._health(never, endpoint=endpoint,
                                    detail="not installed" if never == "unhealthy" else "never started")
            if supervision["state"] in ("failed", "restarting"):
                return self._health("unhealthy", endpoint=endpoint, restarts=restarts, last_error=error,
                                    detail=f"{supervision['state']}: {supervision['last_error']}")
            return self._health(self.stopped_health, endpoint=endpoint, restarts=restarts,
                                last_error=error, detail="stopped")
        try:
            if not self.probe():
                return self._health("unhealthy", endpoint=endpoint, restarts=restarts,
                                    last_error=error, detail="not answering")
            ok, detail = self.health_detail()
            version = self.version()
        except Exception as e:  # a health check reports, it never crashes status
            return self._health("unhealthy", endpoint=endpoint, restarts=restarts,
                                last_error=error, detail=str(e)[:200])
        return self._health("healthy" if ok else "unhealthy", endpoint=endpoint, version=version,
                            restarts=restarts, last_error=error, detail=detail)

    def stop(self) -> bool:
        return self.process.stop()

    def purge(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
