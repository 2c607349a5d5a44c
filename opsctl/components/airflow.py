"""Airflow on the kubernetes target: the apache-airflow chart (platform.yaml
components.airflow.chart) with the project's DAGs (manifests/airflow/dags) mounted where
its scheduler and workers read them. No Airflow runs on the local target yet; the DAGs are
loaded by the Airflow that scripts/setup installs (tests/unit/test_airflow_dag.py).
"""

from __future__ import annotations

from pathlib import Path

DAGS = Path(__file__).resolve().parents[2] / "manifests" / "airflow" / "dags"
DAGS_PATH = "/opt/airflow/dags"  # the chart's dags folder


def chart_values(ctx) -> dict:
    """The DAGs as a ConfigMap of the release, mounted read-only into every Airflow pod. The
    chart passes extraConfigMaps through its templating: a DAG's own `{{` is escaped."""
    files = {p.name: p.read_text().replace("{{", '{{ "{{" }}') for p in sorted(DAGS.glob("*.py"))}
    name = "airflow-dags"  # of the release airflow
    return {"extraConfigMaps": {name: {"data": "\n".join(
                f"{file}: |\n" + "".join(f"  {line}\n" for line in text.splitlines()) for file, text in files.items())}},
            "volumes": [{"name": "dags", "configMap": {"name": name}}],
            "volumeMounts": [{"name": "dags", "mountPath": DAGS_PATH, "readOnly": True}]}
