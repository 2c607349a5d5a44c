"""The Airflow DAG under manifests/: it compiles, and each task runs a real opsctl command.
(Airflow itself is not installed here, so the DAG is not loaded into a DagBag.)"""

import ast
import re
import subprocess
import sys
from pathlib import Path

DAG = Path(__file__).resolve().parents[2] / "manifests" / "airflow" / "dags" / "order_screening.py"


def bash_commands() -> dict[str, str]:
    tree = ast.parse(DAG.read_text())
    commands = {}
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "BashOperator":
            args = {k.arg: k.value for k in call.keywords}
            commands[args["task_id"].value] = ast.unparse(args["bash_command"])
    return commands


def test_the_dag_compiles_and_chains_export_train_score():
    compile(DAG.read_text(), str(DAG), "exec")
    assert list(bash_commands()) == ["export_orders", "train_vae", "batch_score"]
    assert "export >> retrain >> score" in DAG.read_text()


def test_each_task_calls_an_opsctl_command_that_exists():
    for task, command in bash_commands().items():
        words = re.search(r"\{OPSCTL\} ([a-z-]+ [a-z-]+)", command).group(1).split()
        result = subprocess.run([sys.executable, "-m", "opsctl", *words, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, (task, words, result.stderr)
