"""Prometheus (Debian package): scrapes itself and the platform's metrics endpoints, and
evaluates the platform's alerting rules (rules.yml; GET /api/v1/alerts shows the firing ones)."""

from __future__ import annotations

import string
from pathlib import Path

import yaml

from opsctl import httpclient
from opsctl.components.base import Server
from opsctl.host import require_binary

DASHBOARDS = Path(__file__).resolve().parents[2] / "manifests" / "grafana"  # JSON, ${names} filled in from the spec


INGRESS_JOB = "ingress"
SCRAPE = {
    # RabbitMQ's queue depths feed the dead-letter alert: scraped more often.
    "rabbitmq": {"metrics_path": "/metrics", "scrape_interval": "5s"},
    # Envoy's own metrics, every 2 s: a blue/green analysis of 20 s sees ten samples.
    INGRESS_JOB: {"metrics_path": "/stats/prometheus", "scrape_interval": "2s"},
}


def rules(ctx) -> dict:
    """The alerting rules: a dead-lettered order waits for a person (RabbitMQ's per-queue
    metric, prometheus.return_per_object_metrics in components/rabbitmq.py)."""
    queue = ctx.spec.names.queues.dead_letter
    return {"groups": [{"name": "order-flow", "rules": [{
        "alert": "OrdersDeadLettered",
        "expr": f'sum by (queue) (rabbitmq_queue_messages{{queue="{queue}"}}) > 0',
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": f"{{{{ $value }}}} order(s) in {queue}: a consumer could never store them",
            "description": "See why and redrive or drop them: opsctl orders dead-letters list",
        },
    }]}]}


def chart_values(ctx) -> dict:
    """kube-prometheus-stack's values on the kubernetes target: the same alerting rules as
    locally, the services' pods and RabbitMQ scraped, and the project's Grafana dashboards
    as ConfigMaps its Grafana loads (the sidecar's grafana_dashboard label)."""
    spec = ctx.spec
    names = {"dead_letter_queue": spec.names.queues.dead_letter}
    dashboards = [{"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": f"dashboard-{path.stem}", "labels": {"grafana_dashboard": "1"}},
                   "data": {path.name: string.Template(path.read_text()).substitute(names)}}
                  for path in sorted(DASHBOARDS.glob("*.json"))]
    services = {  # every bundled service's pod, on its port named http (HTTP services) or metrics (workers)
        "job_name": "order-services",
        "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [spec.kubernetes.namespace("services")]}}],
        "relabel_configs": [
            {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_part_of"], "regex": spec.platform.name,
             "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http|metrics", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"], "target_label": "job"},
            {"source_labels": ["__meta_kubernetes_pod_label_opsctl_io_colour"], "target_label": "colour"}]}
    rabbitmq = {"job_name": "rabbitmq", "scrape_interval": SCRAPE["rabbitmq"]["scrape_interval"],
                "static_configs": [{"targets": [str(ctx.address("rabbitmq", "prometheus"))]}]}
    return {"additionalPrometheusRulesMap": {"order-flow": rules(ctx)},
            "prometheus": {"prometheusSpec": {"additionalScrapeConfigs": [services, rabbitmq]}},
            "extraManifests": dashboards}


class Prometheus(Server):
    def check_installed(self) -> None:
        require_binary("prometheus", "apt-get install -y prometheus")

    def _targets(self) -> dict[str, list[dict]]:
        """job -> static configs (targets, labels) of every local server that exposes
        metrics on /metrics; each colour's copy of an HTTP service is labelled with it."""
        comps = self.ctx.spec.components
        jobs = {"prometheus": self.address("http")}
        if "prometheus" in comps["rabbitmq"].ports:
            jobs["rabbitmq"] = self.ctx.address("rabbitmq", "prometheus")
        if "management" in comps["keycloak"].ports:
            jobs["keycloak"] = self.ctx.address("keycloak", "management")
        configs = {job: [{"targets": [str(address)]}] for job, address in jobs.items()}
        for name, service in self.ctx.spec.services.items():  # the bundled services
            colours = self.ctx.spec.mesh.datacenters if service.per_colour else [None]
            configs[name] = [{"targets": [str(self.ctx.address(name, colour=c))],
                              **({"labels": {"colour": c}} if c else {})} for c in colours]
        # What each colour's ingress answered the edge: the blue/green analysis reads it.
        configs[INGRESS_JOB] = [{"targets": [str(self.ctx.address("mesh", "ingress/admin", c))],
                                 "labels": {"colour": c}} for c in self.ctx.spec.mesh.datacenters]
        return configs

    def rules(self) -> dict:
        return rules(self.ctx)

    def config_files(self) -> dict[str, str]:
        config = {
            # Rules are evaluated every 5 s, so an alert shows within seconds of its cause.
            "global": {"scrape_interval": "15s", "evaluation_interval": "5s"},
            "rule_files": [str(self.path("rules.yml"))],
            "scrape_configs": [
                {"job_name": job, "static_configs": static, **SCRAPE.get(job, {"metrics_path": "/metrics"})}
                for job, static in self._targets().items()
            ],
        }
        return {"prometheus.yml": yaml.safe_dump(config, sort_keys=False),
                "rules.yml": yaml.safe_dump(self.rules(), sort_keys=False)}

    def argv(self) -> list[str]:
        return ["prometheus", f"--config.file={self.path('prometheus.yml')}",
                f"--storage.tsdb.path={self.path('data')}",
                f"--web.listen-address={self.endpoint()}"]

    def probe(self) -> bool:
        return httpclient.answers(self.address("http").url("/-/ready"), timeout=1)

    def version(self) -> str:
        info = httpclient.get(self.address("http").url("/api/v1/status/buildinfo"), timeout=1)
        return info["data"]["version"]
