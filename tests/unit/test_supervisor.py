"""The local target's supervisor: a real supervisord in a temporary state folder, running
small shell programs in place of servers."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from opsctl.targets.local import supervisor
from opsctl.targets.local.process import Process


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return value


@pytest.fixture
def local(tmp_path):
    home = tmp_path / "state" / "local"
    yield home
    supervisor.shutdown_all(tmp_path / "state")


def program(local: Path, name: str) -> Process:
    return Process(name, local / name)


def start(process: Process, script: str, env: dict | None = None) -> int:
    process.home.mkdir(parents=True, exist_ok=True)
    return process.start(["/bin/sh", "-c", script], env or {}, "fp")


def test_a_started_program_outlives_its_starter_and_is_restarted_when_killed(local):
    worker = program(local, "worker")
    # Started from a child process that then exits, as `opsctl services start` does.
    code = subprocess.run(
        [os.sys.executable, "-c", "import sys; from pathlib import Path; "
         "from opsctl.targets.local.process import Process; "
         f"p = Process('worker', Path({str(local / 'worker')!r})); p.home.mkdir(parents=True); "
         "p.start(['/bin/sh', '-c', 'echo up; exec sleep 600'], {}, 'fp')"]).returncode
    assert code == 0
    first = wait_for(worker.pid, 10, "the program running")
    time.sleep(supervisor.START_SECONDS + 0.5)  # counted as started
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: worker.pid() not in (None, first) and worker.pid(), 15, "a restart")
    assert second != first
    seen = wait_for(lambda: worker.supervision()["restarts"] and worker.supervision(), 10, "the count")
    assert seen["state"] in ("starting", "running") and seen["restarts"] == 1
    assert "exited unexpectedly" in seen["last_error"]
    assert worker.stop() and worker.pid() is None
    assert worker.supervision()["state"] == "stopped"  # stopped on purpose: not a failure
    time.sleep(1)
    assert worker.pid() is None  # and not restarted


def test_the_environment_reaches_the_program_exactly_and_privately(local, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "not-for-children")
    worker = program(local, "env")
    secret = "s3cr%t-with,comma and 'quote"
    start(worker, 'env > "$OUT"; exec sleep 600',
          {"OUT": str(local / "env.out"), "CLIENT_SECRET": secret})
    seen = wait_for(lambda: (local / "env.out").exists() and (local / "env.out").read_text(), 10, "env")
    variables = dict(line.split("=", 1) for line in seen.splitlines() if "=" in line)
    assert variables["CLIENT_SECRET"] == secret
    assert "VAULT_TOKEN" not in variables  # not the environment of whoever started supervisord
    assert secret not in Path(f"/proc/{worker.pid()}/cmdline").read_text()
    for path in (local / "supervisor").rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    assert (local / "env.out").stat().st_mode & 0o077 == 0  # the program's umask is 077


def test_a_program_that_keeps_dying_is_stopped_and_reported_failed_with_its_log(local):
    worker = program(local, "flaky")
    start(worker, f"echo 'connecting to the store'; sleep {supervisor.START_SECONDS + 0.5}; "
                  "echo 'fatal: the store refused us' >&2; exit 3")
    seen = wait_for(lambda: worker.supervision()["state"] == "failed" and worker.supervision(),
                    supervisor.RESTART_LIMIT * (supervisor.START_SECONDS + 2) + 30, "the give-up")
    assert seen["restarts"] == supervisor.RESTART_LIMIT
    assert f"exited unexpectedly {supervisor.RESTART_LIMIT} times" in seen["last_error"]
    assert "fatal: the store refused us" in seen["log_tail"]
    time.sleep(supervisor.START_SECONDS + 1)
    assert worker.pid() is None  # it stays stopped
    # A new start begins a new count.
    start(worker, "exec sleep 600")
    assert wait_for(lambda: worker.supervision()["state"] == "running", 10, "running again")
    assert worker.supervision()["restarts"] == 0


def test_a_program_that_dies_at_once_is_retried_with_backoff_then_fatal(local):
    worker = program(local, "broken")
    started = time.monotonic()
    start(worker, "echo 'bad setting: PORT' >&2; exit 2")
    seen = wait_for(lambda: worker.supervision()["state"] == "failed" and worker.supervision(), 120,
                    "supervisord giving up")
    # supervisord's backoff: 1 + 2 + … seconds between the tries.
    assert time.monotonic() - started >= sum(range(1, supervisor.START_RETRIES))
    assert "supervisord gave up" in seen["last_error"] and "bad setting: PORT" in seen["log_tail"]


def test_programs_started_at_once_from_threads_all_run(local):
    workers = [program(local, f"w{i}") for i in range(6)]
    threads = [threading.Thread(target=start, args=(w, "exec sleep 600")) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(w.pid() for w in workers)


def test_a_changed_program_is_replaced_and_shutdown_stops_everything(local):
    worker = program(local, "svc")
    first = start(worker, "exec sleep 600")
    second = start(worker, "exec sleep 601")
    assert second != first and not Path(f"/proc/{first}").exists()
    wait_for(lambda: "601" in Path(f"/proc/{second}/cmdline").read_text(), 10, "the new command")
    assert supervisor.shutdown_all(local.parent)
    assert not Path(f"/proc/{second}").exists() and worker.pid() is None


def test_a_program_that_exits_while_starting_is_reported_at_once_with_its_log(local):
    from opsctl.errors import OpsError

    worker = program(local, "crash")
    start(worker, "echo 'listen: address already in use' >&2; exit 1")
    started = time.monotonic()
    with pytest.raises(OpsError) as raised:
        worker.wait_ready(lambda: False, 60, threading.Event())
    assert time.monotonic() - started < 10  # not the whole ready timeout
    assert "exited during start-up" in raised.value.message
    assert "address already in use" in raised.value.message
    assert worker.pid() is None  # and not left restarting
