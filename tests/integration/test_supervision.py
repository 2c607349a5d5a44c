"""Every process opsctl starts is supervised: the bundled services on the real platform are
restarted when they die, counted, and reported failed (with their log) when they keep dying;
`opsctl status` shows them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from opsctl.targets.local import supervisor
from tests.integration.conftest import workdir_context
from tests.integration.helpers import process_of, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def running(platform):
    assert platform.run("queues", "apply").returncode == 0
    code, steps = platform.steps("--only", "services")
    assert code == 0, {n: s["detail"] for n, s in steps.items() if s["state"] == "failed"}
    yield platform
    platform.run("services", "stop")


def service(platform, name: str):
    from opsctl.components.services import BundledService

    return BundledService(name, workdir_context(platform))


def status_rows(platform) -> tuple[int, dict]:
    result = platform.run("status", "-o", "json", check_json=True)
    return result.returncode, {row["component"]: row for row in result.json["components"]}


def test_status_shows_every_service_and_the_stream(running):
    code, rows = status_rows(running)
    assert code == 0, {n: r["detail"] for n, r in rows.items() if r["health"] not in ("healthy", "n/a")}
    from opsctl.components.services import every_instance

    for instance in every_instance(workdir_context(running)):  # each colour's copy of an HTTP service
        spec = instance.ctx.spec.services[instance.service]
        assert rows[instance.name]["health"] == ("healthy" if spec.autostart else "n/a"), rows[instance.name]


def test_a_killed_service_is_restarted_by_the_supervisor_and_counted(running):
    consumer = service(running, "regular-consumer")
    first, restarts = process_of(consumer).pid(), status_rows(running)[1]["regular-consumer"]["restarts"]
    # The supervisor outlived the opsctl command that started the service.
    supervisord = int((running.path / ".opsctl/local/supervisor/supervisord.pid").read_text())
    assert Path(f"/proc/{supervisord}").exists() and Path(f"/proc/{first}").exists()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: process_of(consumer).pid() not in (None, first) and consumer.health().ok, 60,
             interval=0.5, what="regular-consumer restarted and healthy")
    code, rows = wait_for(lambda: (lambda r: r[1]["regular-consumer"]["restarts"] > restarts and r)(
        status_rows(running)), 30, interval=0.5, what="the restart counted")
    assert code == 0 and rows["regular-consumer"]["restarts"] == restarts + 1
    assert "exited unexpectedly" in rows["regular-consumer"]["last_error"]


def test_a_service_that_keeps_dying_is_reported_failed_with_its_log_and_status_exits_3(running):
    consumer = service(running, "digital-consumer")

    def next_run(previous):
        """Its new pid once restarted, "failed" once given up on, else None (not yet)."""
        pid = process_of(consumer).pid()
        if pid not in (None, previous):
            return pid
        return "failed" if pid is None and consumer.health().detail.startswith("failed") else None

    # Exits of earlier tests within the window count too: kill until it is given up on,
    # which must come by the limit.
    pid, kills = None, 0
    while kills < supervisor.RESTART_LIMIT and (
            run := wait_for(lambda: next_run(pid), 60, interval=0.2,
                            what="digital-consumer running again, or given up on")) != "failed":
        pid = run
        time.sleep(supervisor.START_SECONDS + 0.5)  # counted as started, not as a failed start
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # supervisord restarted it, then the watcher stopped it
            continue
        kills += 1
    assert kills >= 1
    code, rows = wait_for(lambda: (lambda r: r[1]["digital-consumer"]["health"] == "unhealthy" and r)(
        status_rows(running)), 30, interval=0.5, what="digital-consumer reported failed")
    row = rows["digital-consumer"]
    assert code == 3
    assert row["detail"].startswith(f"failed: exited unexpectedly {supervisor.RESTART_LIMIT} times")
    assert row["restarts"] >= kills
    assert "  | " in row["last_error"]  # the last lines of its log
    assert process_of(consumer).pid() is None  # given up on: not restarted again

    text = running.run("status")
    assert text.returncode == 3 and "digital-consumer" in text.stderr and "exited unexpectedly" in text.stderr

    again = running.run("services", "start", "digital-consumer")
    assert again.returncode == 0, again.stdout + again.stderr
    code, rows = status_rows(running)
    assert code == 0 and rows["digital-consumer"]["restarts"] == 0
