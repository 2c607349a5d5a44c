"""Nightly retraining of the screening VAE and batch scoring, with the same opsctl jobs a
person runs by hand: export the stored regular orders to a file, retrain the VAE on them
(read from MongoDB), then score the export with the new model.
OPSCTL (the command, default `opsctl`) and OPSCTL_WORKDIR (the folder holding opsctl.yaml
and .opsctl/) come from the Airflow worker's environment. Written for Airflow 3 (the Task
SDK's DAG, the standard provider's BashOperator); tests/unit/test_airflow_dag.py loads it
into a DagBag of the Airflow that scripts/setup installs."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG

OPSCTL = os.environ.get("OPSCTL", "opsctl")
WORKDIR = os.environ.get("OPSCTL_WORKDIR", ".")
SCORED = "{{ ds }}"  # the run's date names the export it writes and scores

with DAG(
    dag_id="order_screening",
    description="Retrain the order-screening VAE nightly, then score the stored orders",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["opsctl", "screening"],
) as dag:
    export = BashOperator(
        task_id="export_orders",
        bash_command=f"cd {WORKDIR} && {OPSCTL} orders export --out .opsctl/orders-{SCORED}.jsonl",
    )
    retrain = BashOperator(
        task_id="train_vae",
        bash_command=f"cd {WORKDIR} && {OPSCTL} jobs train-vae --from mongo -o json",
    )
    score = BashOperator(
        task_id="batch_score",
        bash_command=f"cd {WORKDIR} && {OPSCTL} jobs score .opsctl/orders-{SCORED}.jsonl -o json",
    )
    export >> retrain >> score
