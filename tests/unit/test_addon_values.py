"""What opsctl gives the add-ons' upstream charts from the rest of the spec: the same alert
rules and the project's dashboards to kube-prometheus-stack, the project's DAGs to Airflow.
(Those charts cannot be fetched here: their values are what the plan checks.)"""

from __future__ import annotations

import json
from pathlib import Path

from opsctl import spec
from opsctl.components import build
from opsctl.components.prometheus import rules
from opsctl.context import Context


def values(tmp_path: Path, name: str, override: str = "") -> dict:
    config = tmp_path / "opsctl.yaml"
    config.write_text(override)
    return build(name, Context(spec.load(config), "kubernetes", tmp_path / ".opsctl")).release().values


def test_prometheus_gets_the_local_rules_the_services_pods_and_the_dashboards(tmp_path):
    found = values(tmp_path, "prometheus-grafana", "names: {queues: {dead_letter: held-for-people}}")
    ctx = Context(spec.load(tmp_path / "opsctl.yaml"), "kubernetes", tmp_path / ".opsctl")
    assert found["additionalPrometheusRulesMap"]["order-flow"] == rules(ctx)
    scrape = {job["job_name"]: job for job in found["prometheus"]["prometheusSpec"]["additionalScrapeConfigs"]}
    assert scrape["order-services"]["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["opsctl-services"]
    assert scrape["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq.opsctl-messaging.svc.cluster.local:15692"]
    dashboard, = found["extraManifests"]
    assert dashboard["metadata"]["labels"] == {"grafana_dashboard": "1"}  # what the chart's Grafana sidecar loads
    panels = json.loads(dashboard["data"]["order-flow.json"])["panels"]
    assert any('queue="held-for-people"' in t["expr"] for p in panels for t in p["targets"])  # names from the spec
    assert "{{" not in dashboard["data"]["order-flow.json"]  # the chart templates its extraManifests


def test_airflow_mounts_the_projects_dags_escaped_for_the_charts_templating(tmp_path):
    found = values(tmp_path, "airflow")
    configmap, = found["extraConfigMaps"]
    assert found["volumes"] == [{"name": "dags", "configMap": {"name": configmap}}]
    assert found["volumeMounts"][0]["mountPath"] == "/opt/airflow/dags"
    data = found["extraConfigMaps"][configmap]["data"]
    assert data.startswith("order_screening.py: |\n") and '{{ "{{" }} ds }}' in data
