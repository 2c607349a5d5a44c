"""What every component module implements: a component reconciles itself from the spec
and reports its health; a Server describes a server the target runs (opsctl.targets).

Component modules own their component's desired state, health checks and users; they
import no target (a target is reached through ctx.runtime) and nothing from commands.
"""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from opsctl.context import Context
from opsctl.host import system_user
from opsctl.net import Address
from opsctl.spec import Component as ComponentSpec, UpstreamChart


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
        """Stop its servers, the last one first; True if one was running."""
        return any([server.stop() for server in reversed(self.servers())])

    def purge(self) -> None:
        """Delete what its servers keep outside the state folder (most keep nothing)."""
        for server in self.servers():
            server.purge()

    def servers(self) -> list["Server"]:
        """The servers the target runs for it: none, itself, or several (Consul's agents)."""
        return []

    def _health(self, health: str, **kw) -> Health:
        return Health(self.name, self.number, self.ctx.target, health, **kw)


class Skipped(Component):
    """A step with no meaning on this target, or one that has not landed yet."""

    def __init__(self, name: str, ctx: Context, reason: str):
        super().__init__(name, ctx)
        self.reason = reason

    def _component_spec(self) -> ComponentSpec | None:
        return self.ctx.spec.components.get(self.name)  # None for a configuration step

    def reconcile(self) -> Outcome:
        return Outcome("skipped", self.reason)

    def health(self) -> Health:
        return self._health("n/a", detail=self.reason)


@dataclass
class Change:
    """One difference between the spec and a running system, and how to remove it."""

    action: str  # create | update | delete
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


@dataclass
class Release:
    """What a server is on the kubernetes target: a release of the project's chart
    manifests/charts/<chart> with these values, reading the generated credentials
    `secrets` (their names; each generated once into the release's Secret
    <release>-credentials and never printed)."""

    chart: str
    values: dict
    secrets: list[str] = field(default_factory=list)
    upstream: UpstreamChart | None = None  # an add-on's chart, fetched (else manifests/charts/<chart>)


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Server(Component):
    """A component that runs as a server: what it is (its files, command, environment,
    readiness probe, the state it converges to once ready), never how it is run. The
    target (ctx.runtime) runs it: on the local target a supervised process on the bind
    address, restarted only when this description changes."""

    ready_timeout = 60.0
    stop_signal = signal.SIGTERM
    stop_timeout = 60.0
    stop_group = True  # the stop signal goes to every process of the server, not only its leader
    reload_signal: int | None = None  # rereads its files on this signal: a change to them only is no restart
    run_as: str | None = None  # system user for servers that refuse to run as root
    converges_on_cluster = False  # converge() runs on the kubernetes target too, through a port-forward
    stopped_health = "stopped"          # what a server stopped on purpose counts as (exit 3)
    never_started_health = "unhealthy"  # and one never installed here

    def __init__(self, name: str, ctx: Context):
        super().__init__(name, ctx)
        self.home = ctx.local_dir(name)  # its files, data and logs
        self.user = system_user(self.run_as)

    # --- what a subclass describes -------------------------------------------------
    def check_installed(self) -> None:
        """Raise OpsError naming the install command when a binary or artifact is missing."""

    def config_files(self) -> dict[str, str]:
        """Files (relative to the component folder) rendered from the spec."""
        return {}

    def initialise(self) -> None:
        """One-time set-up of the data folder; must be idempotent and crash-safe."""

    def companions(self) -> dict[str, list[str]]:
        """Helper programs that run beside the server, started before it and stopped after
        it: name -> command (RabbitMQ's epmd)."""
        return {}

    def start_dir(self) -> Path:
        """The folder it starts in."""
        return self.home

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

    def release(self) -> Release | None:
        """Its form on the kubernetes target; None: not on that target yet."""
        return None

    def health_detail(self) -> tuple[bool, str]:
        """(healthy, detail) of a ready server; override for richer checks."""
        return True, ""

    def port_setting(self, key: str) -> str:
        """Where opsctl.yaml sets this port (shown when the port is taken)."""
        return f"components:\n    {self.name}:\n      ports: {{{key}: <free port>}}"

    def fingerprint(self) -> str:
        """Changes when the server must restart (or reload) to take a new configuration."""
        return fingerprint(self.argv(), self.env(), self.config_files())

    def launch_fingerprint(self) -> str:
        """Changes when only a restart takes the new configuration (its command, environment)."""
        return fingerprint(self.argv(), self.env())

    # --- helpers -----------------------------------------------------------------------
    def users(self) -> list[str]:
        """The bundled services whose credentials name this server: the only pods its
        NetworkPolicy admits on the kubernetes target."""
        return sorted(n for n, s in self.ctx.spec.services.items() if self.name in s.credentials)

    def port(self, key: str) -> int:
        return self.spec.ports[key]

    def address(self, port: str = "") -> Address:
        return self.ctx.address(self.name, port)

    def path(self, *parts: str) -> Path:
        return self.home.joinpath(*parts)

    # --- run by the target ---------------------------------------------------------------
    def servers(self) -> list["Server"]:
        return [self]

    def reconcile(self) -> Outcome:
        return self.ctx.runtime.apply(self)

    def health(self) -> Health:
        return self.ctx.runtime.health(self)

    def stop(self) -> bool:
        return self.ctx.runtime.stop(self)

    def purge(self) -> None:
        self.ctx.runtime.purge(self)
