"""The exported Postman collection, run with newman against the real Keycloak and services."""

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NEWMAN = Path(__file__).resolve().parents[2] / "scripts" / "newman" / "node_modules" / ".bin" / "newman"


@pytest.fixture
def api(platform):
    if not NEWMAN.exists():
        pytest.fail("newman is not installed: run scripts/setup")
    assert platform.run("queues", "apply").returncode == 0
    started = platform.run("services", "start", "stock-service", "order-creator")
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    platform.run("services", "stop", "stock-service", "order-creator")


def test_collection_runs_green_against_the_running_services(platform, api, tmp_path):
    collection, environment = tmp_path / "orders.postman.json", tmp_path / "local.postman_env.json"
    assert platform.run("postman", "export", str(collection)).returncode == 0
    # An environment without a token: the collection's pre-request script fetches one.
    assert platform.run("token", "--postman-env", str(environment)).returncode == 0
    env = json.loads(environment.read_text())
    for value in env["values"]:
        if value["key"] == "access_token":
            value["value"] = ""
    environment.write_text(json.dumps(env))

    report = tmp_path / "report.json"
    run = subprocess.run([str(NEWMAN), "run", str(collection), "-e", str(environment), "--color", "off",
                          "--reporters", "cli,json", "--reporter-json-export", str(report)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    stats = json.loads(report.read_text())["run"]["stats"]
    assert stats["assertions"]["failed"] == 0 and stats["requests"]["failed"] == 0
    assert stats["assertions"]["total"] >= 5
