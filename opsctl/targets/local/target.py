"""The local target: every server a supervised process on the bind address, with its files,
data and logs under .opsctl/local/<component>/ (see process.py and supervisor.py).

A server is written out, initialised once, started and waited for; it is restarted only
when its description (command, environment, files) changed, and left alone otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from opsctl.components.base import Health, Outcome, Server
from opsctl.errors import OpsError
from opsctl.files import write_atomic
from opsctl.host import chown_tree, port_free
from opsctl.net import Address
from opsctl.spec import Spec
from opsctl.targets import Target
from opsctl.targets.local import supervisor
from opsctl.targets.local.process import Process


class LocalTarget(Target):
    name = "local"

    def address(self, spec: Spec, name: str, port: str = "", colour: str | None = None) -> Address:
        host = spec.platform.bind_address
        if name == "mesh":  # a colour's gateways and sidecars (Spec.mesh_ports)
            return Address(host, spec.mesh_ports(colour or "blue")[port])
        if name in spec.services:
            return Address(host, spec.service_port(name, colour))
        entry = spec.components.get(name)
        if entry is None or not entry.ports or (port and port not in entry.ports):
            raise KeyError(f"{name} has no port {port!r}")
        return Address(host, entry.ports[port] if port else next(iter(entry.ports.values())))

    def process(self, server: Server) -> Process:
        return Process(server.name, server.home)

    def running(self, server: Server) -> bool:
        return self.process(server).running()

    def logfile(self, server: Server) -> Path:
        return self.process(server).logfile

    def _check_ports(self, server: Server) -> None:
        host = server.ctx.host
        for key, port in server.spec.ports.items():
            if not port_free(host, port):
                raise OpsError(
                    f"{server.name} cannot listen on {host}:{port} ({key} port): another process is using it",
                    f"stop that process, or pick another port in opsctl.yaml:\n  {server.port_setting(key)}")

    def apply(self, server: Server) -> Outcome:
        self.prepare(server)
        process = self.process(server)
        running = process.running()
        wanted = server.fingerprint()
        if running and process.fingerprint != wanted:
            reloads = server.reload_signal and process.launch == server.launch_fingerprint()
            action = "reload: configuration changed" if reloads else "restart: configuration changed"
        elif running:
            action = None
        else:
            action = "start"
        if server.ctx.dry_run:
            return Outcome("planned", action) if action else Outcome("unchanged", server.endpoint())
        changed = []
        if action and action.startswith("reload"):
            for rel, content in server.config_files().items():
                write_atomic(server.path(rel), content, mode=0o600)
            process.reload(server.reload_signal, wanted)
            changed.append("reloaded")
        elif action:
            self.stop(server)  # a running one, or one supervisord is still stopping or restarting
            self._check_ports(server)
            server.home.mkdir(parents=True, exist_ok=True)
            for rel, content in server.config_files().items():
                write_atomic(server.path(rel), content, mode=0o600)
            server.initialise()
            chown_tree(server.home, server.user)
            for name, argv in server.companions().items():
                companion = Process(name, server.home)
                if not companion.running():
                    companion.start(argv, {}, name)
            process.start(server.argv(), server.env(), wanted, user=server.user, cwd=server.start_dir(),
                          stop_signal=server.stop_signal, stop_timeout=server.stop_timeout,
                          stop_group=server.stop_group, launch=server.launch_fingerprint())
            changed.append("started" if action == "start" else "restarted")
        process.wait_ready(server.probe, server.ready_timeout, server.ctx.cancel)
        converged = server.converge()
        if converged:
            changed.append(converged)
        if not changed:
            return Outcome("unchanged", server.endpoint())
        return Outcome("changed", f"{', '.join(changed)}: {server.endpoint()}")

    def health(self, server: Server) -> Health:
        report = server._health
        endpoint = server.endpoint()
        supervision = self.process(server).supervision()
        restarts, error = supervision["restarts"], supervision["last_error"]
        if error and supervision["log_tail"]:
            error = f"{error}\n{supervision['log_tail']}"
        if supervision["state"] not in ("running", "starting"):
            if not server.home.exists():
                never = server.never_started_health
                return report(never, endpoint=endpoint,
                              detail="not installed" if never == "unhealthy" else "never started")
            if supervision["state"] in ("failed", "restarting"):
                return report("unhealthy", endpoint=endpoint, restarts=restarts, last_error=error,
                              detail=f"{supervision['state']}: {supervision['last_error']}")
            return report(server.stopped_health, endpoint=endpoint, restarts=restarts,
                          last_error=error, detail="stopped")
        try:
            if not server.probe():
                return report("unhealthy", endpoint=endpoint, restarts=restarts,
                              last_error=error, detail="not answering")
            ok, detail = server.health_detail()
            version = server.version()
        except Exception as e:  # a health check reports, it never crashes status
            return report("unhealthy", endpoint=endpoint, restarts=restarts,
                          last_error=error, detail=str(e)[:200])
        return report("healthy" if ok else "unhealthy", endpoint=endpoint, version=version,
                      restarts=restarts, last_error=error, detail=detail)

    def stop(self, server: Server) -> bool:
        stopped = self.process(server).stop()
        for name in server.companions():
            Process(name, server.home).stop()
        return stopped

    def purge(self, server: Server) -> None:
        shutil.rmtree(server.home, ignore_errors=True)

    def shutdown(self) -> None:
        supervisor.shutdown_all(self.state_dir)
