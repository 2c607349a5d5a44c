"""The Airflow DAG under manifests/: a real Airflow loads it into a DagBag without errors or
deprecation warnings, it chains export → train → score nightly, and each task runs a real
opsctl command.

Airflow lives in a virtual environment of its own, .venv-airflow (scripts/setup installs it;
its dependency pins would fight .venv's), so the DagBag is filled in a subprocess with that
environment's python. Parsing needs no Airflow database: the one configured here cannot exist.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from opsctl import spec

ROOT = Path(__file__).resolve().parents[2]
DAG = ROOT / "manifests" / "airflow" / "dags" / "order_screening.py"
AIRFLOW_PYTHON = ROOT / ".venv-airflow" / "bin" / "python"
DS = "2026-01-02"  # the run date the bash commands' {{ ds }} is rendered with

# Runs in .venv-airflow: fills a DagBag from the DAG file and writes what the tests check as JSON.
LOAD = """
import json, sys
import airflow
from airflow.dag_processing.dagbag import DagBag

dag_file, ds, out = sys.argv[1:]
bag = DagBag(dag_folder=dag_file)
dags = {
    dag.dag_id: {
        "schedule": dag.schedule,
        "tasks": [{"task_id": t.task_id,
                   "operator": f"{type(t).__module__}.{type(t).__name__}",
                   "upstream": sorted(t.upstream_task_ids),
                   "downstream": sorted(t.downstream_task_ids),
                   "bash_command": t.render_template(t.bash_command, {"ds": ds})}
                  for t in dag.topological_sort()],
    }
    for dag in bag.dags.values()
}
with open(out, "w") as f:
    json.dump({"airflow": airflow.__version__, "import_errors": bag.import_errors,
               "warnings": {k: list(v) for k, v in bag.captured_warnings.items()},
               "dags": dags}, f, default=str)
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory) -> dict:
    if not AIRFLOW_PYTHON.exists():
        pytest.fail(f"Airflow is not installed: {AIRFLOW_PYTHON.relative_to(ROOT)} is missing; "
                    "run scripts/setup (it installs Airflow into .venv-airflow)", pytrace=False)
    home = tmp_path_factory.mktemp("airflow-home")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "OPSCTL", "PYTHON"))}  # nothing of this machine's own Airflow
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/no-such-folder/airflow.db")
    out = home / "dagbag.json"
    result = subprocess.run([str(AIRFLOW_PYTHON), "-c", LOAD, str(DAG), DS, str(out)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"filling the DagBag failed:\n{result.stderr[-4000:]}"
    return json.loads(out.read_text())


def test_the_airflow_of_the_setup_is_the_platforms(dagbag):
    assert dagbag["airflow"] == spec.load(None).components["airflow"].version


def test_airflow_loads_the_dag_without_errors_or_deprecations(dagbag):
    assert dagbag["import_errors"] == {}
    assert dagbag["warnings"] == {}
    assert list(dagbag["dags"]) == ["order_screening"]


def test_the_dag_chains_export_train_score_nightly(dagbag):
    dag = dagbag["dags"]["order_screening"]
    assert dag["schedule"] == "0 2 * * *"
    tasks = {t["task_id"]: t for t in dag["tasks"]}
    assert [t["task_id"] for t in dag["tasks"]] == ["export_orders", "train_vae", "batch_score"]
    assert {name: (t["upstream"], t["downstream"]) for name, t in tasks.items()} == {
        "export_orders": ([], ["train_vae"]),
        "train_vae": (["export_orders"], ["batch_score"]),
        "batch_score": (["train_vae"], []),
    }
    assert {t["operator"] for t in dag["tasks"]} == {"airflow.providers.standard.operators.bash.BashOperator"}
    export, score = tasks["export_orders"]["bash_command"], tasks["batch_score"]["bash_command"]
    assert f".opsctl/orders-{DS}.jsonl" in export and f".opsctl/orders-{DS}.jsonl" in score


def test_each_task_calls_an_opsctl_command_that_exists(dagbag):
    for task in dagbag["dags"]["order_screening"]["tasks"]:
        command = re.search(r"(?:^|&&)\s*opsctl (.*)$", task["bash_command"]).group(1)
        # --help after the task's own arguments: click rejects an unknown option before it helps.
        result = subprocess.run([sys.executable, "-m", "opsctl", *shlex.split(command), "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0, (task["task_id"], command, result.stderr)
