"""A cluster add-on on the kubernetes target (cert-manager, Consul, kube-prometheus-stack,
Airflow): a release of its own upstream chart, pinned in platform.yaml
(`components.<name>.chart`), with the values given there. The target fetches the chart
(opsctl/targets/kubernetes/charts.py); where it cannot, the step fails saying why.
"""

from __future__ import annotations

import importlib

from opsctl.components.base import Release, Server
from opsctl.spec import deep_merge

# Values an add-on's own component module derives from the rest of the spec (ctx -> values);
# those platform.yaml gives its chart are merged over them (what is written wins).
DERIVED = {
    "consul": "opsctl.components.consul:chart_values",
    "nginx": "opsctl.components.nginx:chart_values",
    "prometheus-grafana": "opsctl.components.prometheus:chart_values",
    "airflow": "opsctl.components.airflow:chart_values",
}


# The add-ons clients reach, and on which of their ports (the chart's Service is named after
# the component, on that port).
ENDPOINTS = {"nginx": "http"}


class Addon(Server):
    def endpoint(self) -> str:
        return str(self.ctx.address(self.name, ENDPOINTS[self.name])) if self.name in ENDPOINTS else ""

    def release(self) -> Release:
        chart = self.spec.chart
        values = chart.values
        if self.name in DERIVED:
            module, _, function = DERIVED[self.name].partition(":")
            values = deep_merge(getattr(importlib.import_module(module), function)(self.ctx), values)
        return Release(f"{chart.name} {chart.version}", values, upstream=chart)
