"""A cluster add-on on the kubernetes target (cert-manager, Consul, kube-prometheus-stack,
Airflow): a release of its own upstream chart, pinned in platform.yaml
(`components.<name>.chart`), with the values given there. The target fetches the chart
(opsctl/targets/kubernetes/charts.py); where it cannot, the step fails saying why.
"""

from __future__ import annotations

from opsctl.components.base import Release, Server


class Addon(Server):
    def endpoint(self) -> str:
        return ""

    def release(self) -> Release:
        chart = self.spec.chart
        values = chart.values
        if self.name == "consul":  # this cluster's datacenter, as the services' CRs name it
            values = {**values, "global": {**values.get("global", {}), "datacenter": self.ctx.spec.kubernetes.datacenter}}
        return Release(f"{chart.name} {chart.version}", values, upstream=chart)
