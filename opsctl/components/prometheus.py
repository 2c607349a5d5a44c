"""Prometheus (Debian package): scrapes itself and the platform's metrics endpoints."""

from __future__ import annotations

import yaml

from opsctl import httpclient
from opsctl.components.base import LocalServer
from opsctl.targets.local.process import require_binary


class Prometheus(LocalServer):
    def check_installed(self) -> None:
        require_binary("prometheus", "apt-get install -y prometheus")

    def _targets(self) -> dict[str, tuple[str, str]]:
        """job -> (host:port, metrics path) of every local server that exposes metrics."""
        host, comps = self.ctx.host, self.ctx.spec.components
        jobs = {"prometheus": (f"{host}:{self.port('http')}", "/metrics")}
        if "prometheus" in comps["rabbitmq"].ports:
            jobs["rabbitmq"] = (f"{host}:{comps['rabbitmq'].ports['prometheus']}", "/metrics")
        if "management" in comps["keycloak"].ports:
            jobs["keycloak"] = (f"{host}:{comps['keycloak'].ports['management']}", "/metrics")
        for name, service in self.ctx.spec.services.items():  # the bundled services
            jobs[name] = (f"{host}:{service.port or service.metrics_port}", "/metrics")
        return jobs

    def config_files(self) -> dict[str, str]:
        config = {
            "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
            "scrape_configs": [
                {"job_name": job, "metrics_path": path, "static_configs": [{"targets": [target]}]}
                for job, (target, path) in self._targets().items()
            ],
        }
        return {"prometheus.yml": yaml.safe_dump(config, sort_keys=False)}

    def argv(self) -> list[str]:
        return ["prometheus", f"--config.file={self.path('prometheus.yml')}",
                f"--storage.tsdb.path={self.path('data')}",
                f"--web.listen-address={self.endpoint()}"]

    def probe(self) -> bool:
        return httpclient.answers(f"http://{self.endpoint()}/-/ready", timeout=1)

    def version(self) -> str:
        info = httpclient.get(f"http://{self.endpoint()}/api/v1/status/buildinfo", timeout=1)
        return info["data"]["version"]
