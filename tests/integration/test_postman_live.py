"""The exported Postman collection, run with newman against the real Keycloak and services,
through the edge (nginx) as every client."""

import json
import subprocess
import time
from pathlib import Path

import pytest

from opsctl.components import nginx
from tests.integration.conftest import workdir_context

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
    edge = nginx.edge_url(workdir_context(platform))
    assert {v["key"]: v["value"] for v in env["values"]}["base_url"] == edge
    variables = {v["key"]: v["value"] for v in json.loads(collection.read_text())["variable"]}
    assert variables["base_url"] == edge
    for value in env["values"]:
        if value["key"] == "access_token":
            value["value"] = ""
    environment.write_text(json.dumps(env))

    log = workdir_context(platform).local_dir("nginx") / "logs" / "access.log"
    before = log.stat().st_size if log.exists() else 0
    report = tmp_path / "report.json"
    run = subprocess.run([str(NEWMAN), "run", str(collection), "-e", str(environment), "--color", "off",
                          "--reporters", "cli,json", "--reporter-json-export", str(report)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    stats = json.loads(report.read_text())["run"]["stats"]
    assert stats["assertions"]["failed"] == 0 and stats["requests"]["failed"] == 0
    assert stats["assertions"]["total"] >= 6
    # Every request went through the edge to a service (none answered by the edge itself).
    time.sleep(1.5)  # the access log is flushed every second
    with log.open("rb") as f:
        f.seek(before)
        entries = [json.loads(line) for line in f.read().decode().splitlines()]
    upstreams = {e["uri"].split("/")[1]: e["upstream"] for e in entries if e["uri"].startswith("/")}
    for first in ("health", "orders", "create", "order", "all-products-by-category", "stock"):
        assert upstreams.get(first), (first, entries)
