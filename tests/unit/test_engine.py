"""The step engine: ordering, dependencies, failures, dry-run, state file, interruption."""

import threading
import time
from pathlib import Path

import pytest

from opsctl import spec as spec_mod
from opsctl.components.base import Component, Outcome
from opsctl.context import Context
from opsctl.engine.runner import run_steps
from opsctl.engine.state import StateFile, exclusive
from opsctl.errors import OpsError
from opsctl.errors import Interrupted


class Board:
    def __init__(self):
        self.events = []

    def update(self, name, state, detail="", duration=None):
        self.events.append((name, state))


class Fake(Component):
    """Records when it ran; converges once, then reports unchanged (like a real server)."""

    def __init__(self, name, ctx, log, fail=False, delay=0.0, after=()):
        super().__init__(name, ctx)
        self.log, self.fail, self.delay, self.after = log, fail, delay, after
        self.done = False

    def reconcile(self):
        self.log.append(("start", self.name))
        if self.ctx.cancel.wait(self.delay):
            raise Interrupted()
        self.log.append(("end", self.name))
        if self.fail:
            raise OpsError(f"{self.name} broke", "fix it")
        if self.ctx.dry_run:
            return Outcome("unchanged" if self.done else "planned", "start")
        if self.done:
            return Outcome("unchanged")
        self.done = True
        return Outcome("changed", "started")


@pytest.fixture
def ctx(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    return Context(spec_mod.load(str(empty)), "local", tmp_path / ".opsctl")


def fakes(ctx, log, **overrides):
    return [Fake(name, ctx, log, **overrides.get(name, {})) for name in ("nginx", "rabbitmq", "postgres")]


def test_runs_in_step_order_one_at_a_time(ctx):
    log = []
    results = run_steps(ctx, fakes(ctx, log), None, Board(), parallel=1)
    assert [r.name for r in results] == ["nginx", "rabbitmq", "postgres"]
    assert [name for what, name in log if what == "start"] == ["nginx", "rabbitmq", "postgres"]
    assert {r.state for r in results} == {"changed"}


def test_independent_steps_overlap_when_parallel(ctx):
    log = []
    comps = fakes(ctx, log, nginx={"delay": 0.3}, rabbitmq={"delay": 0.3})
    run_steps(ctx, comps, None, Board(), parallel=4)
    assert log.index(("start", "rabbitmq")) < log.index(("end", "nginx"))


def test_dependent_step_waits_for_its_prerequisite(ctx):
    log = []
    comps = fakes(ctx, log, nginx={"delay": 0.2, "after": ("postgres",)})
    results = run_steps(ctx, comps, None, Board(), parallel=4)
    assert log.index(("end", "postgres")) < log.index(("start", "nginx"))
    assert [r.name for r in results] == ["nginx", "rabbitmq", "postgres"]  # still shown in order


def test_failure_is_reported_and_dependents_skipped_others_continue(ctx):
    log = []
    comps = fakes(ctx, log, rabbitmq={"fail": True}, postgres={"after": ("rabbitmq",)})
    by_name = {r.name: r for r in run_steps(ctx, comps, None, Board(), parallel=2)}
    assert by_name["rabbitmq"].state == "failed"
    assert "rabbitmq broke" in by_name["rabbitmq"].detail and "hint: fix it" in by_name["rabbitmq"].detail
    assert by_name["postgres"].state == "skipped" and "needs rabbitmq" in by_name["postgres"].detail
    assert by_name["nginx"].state == "changed"


def test_a_step_skipped_for_a_failure_holds_back_its_own_dependents(ctx):
    log = []
    comps = fakes(ctx, log, nginx={"fail": True}, rabbitmq={"after": ("nginx",)},
                  postgres={"after": ("rabbitmq",)})
    by_name = {r.name: r for r in run_steps(ctx, comps, None, Board(), parallel=2)}
    assert by_name["rabbitmq"].state == "skipped" and "needs nginx" in by_name["rabbitmq"].detail
    assert by_name["postgres"].state == "skipped" and "needs rabbitmq" in by_name["postgres"].detail
    assert ("start", "postgres") not in log


def test_unexpected_exception_fails_only_its_step(ctx):
    log = []
    comps = fakes(ctx, log)
    comps[0].reconcile = lambda: 1 / 0
    by_name = {r.name: r for r in run_steps(ctx, comps, None, Board(), parallel=1)}
    assert by_name["nginx"].state == "failed" and "ZeroDivisionError" in by_name["nginx"].detail
    assert by_name["postgres"].state == "changed"


def test_second_run_reports_unchanged(ctx):
    log = []
    comps = fakes(ctx, log)
    run_steps(ctx, comps, None, Board())
    assert {r.state for r in run_steps(ctx, comps, None, Board())} == {"unchanged"}


def test_dry_run_plans_and_writes_no_state(ctx):
    ctx.dry_run = True
    state = StateFile(ctx.state_dir / "state.json")
    results = run_steps(ctx, fakes(ctx, []), state, Board())
    assert {r.state for r in results} == {"planned"}
    assert not (ctx.state_dir / "state.json").exists()


def test_state_file_records_each_step_and_the_run(ctx):
    path = ctx.state_dir / "state.json"
    state = StateFile(path)
    state.begin("install", "local", ["nginx", "rabbitmq", "postgres"])
    run_steps(ctx, fakes(ctx, [], rabbitmq={"fail": True}), state, Board())
    state.finish("failed")
    again = StateFile(path)
    assert again.data["steps"]["nginx"]["state"] == "changed"
    assert again.data["steps"]["rabbitmq"]["state"] == "failed"
    assert again.unfinished_run()["result"] == "failed"
    again.begin("install", "local", ["rabbitmq"])
    again.finish("ok")
    assert StateFile(path).unfinished_run() is None
    assert StateFile(path).data["steps"]["nginx"]["state"] == "changed"  # kept across runs


def test_cancel_interrupts_waiting_steps_and_starts_no_more(ctx):
    log = []
    comps = fakes(ctx, log, nginx={"delay": 30})
    threading.Timer(0.3, ctx.cancel.set).start()
    started = time.monotonic()
    results = {r.name: r for r in run_steps(ctx, comps, None, Board(), parallel=1)}
    assert time.monotonic() - started < 5
    assert results["nginx"].state == "interrupted"
    assert results["postgres"].state == "pending"
    assert ("start", "postgres") not in log


def test_only_one_run_at_a_time(tmp_path):
    lock = tmp_path / "opsctl.lock"
    with exclusive(lock, "install"):
        with pytest.raises(OpsError, match="cannot run install: opsctl install .pid [0-9]+. is running"):
            with exclusive(lock, "install"):
                pass
    with exclusive(lock, "install"):  # released afterwards
        pass


def test_postgres_data_moves_out_of_a_folder_its_user_cannot_enter(ctx):
    import os
    import shutil
    import tempfile

    from opsctl.components.postgres import EXTERNAL_DATA, Postgres

    if os.geteuid() != 0:
        pytest.skip("the postgres system user is only used when opsctl runs as root")
    top = Path(tempfile.mkdtemp())
    try:
        top.chmod(0o755)
        private = top / "private"
        private.mkdir(mode=0o700)
        ctx.state_dir = private / ".opsctl"
        assert Postgres("postgres", ctx).data.parent == EXTERNAL_DATA
        private.chmod(0o755)
        # A state folder yet to be made is made private (umask 077): out too.
        assert Postgres("postgres", ctx).data.parent == EXTERNAL_DATA
        # One made open by an older opsctl keeps its data where it is.
        (private / ".opsctl" / "local").mkdir(mode=0o755, parents=True)
        for folder in (private / ".opsctl", private / ".opsctl" / "local"):
            folder.chmod(0o755)
        assert Postgres("postgres", ctx).data == private / ".opsctl" / "local" / "postgres" / "data"
    finally:
        shutil.rmtree(top)


def test_dry_run_plans_dependents_of_planned_steps_without_running_them(ctx):
    ctx.dry_run = True
    log = []
    comps = fakes(ctx, log, postgres={"after": ("rabbitmq",)})
    by_name = {r.name: r for r in run_steps(ctx, comps, None, Board())}
    assert by_name["postgres"].state == "planned" and by_name["postgres"].detail == "after rabbitmq"
    assert ("start", "postgres") not in log


def test_kafka_formats_storage_with_a_cluster_id_that_starts_with_a_dash(ctx, monkeypatch, tmp_path):
    """Kafka's cluster ids are URL-safe base64: one in 64 starts with '-'."""
    import subprocess
    import uuid

    from opsctl.components.kafka import Kafka

    ctx.state_dir = tmp_path / ".opsctl"
    seen = []
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(bytes=b"\xfb" + b"\x00" * 15))

    def fake_run(argv, **kw):
        seen.append(argv)
        Path(argv[argv.index("--config") + 1]).parent.joinpath("..", "data.formatting").resolve().mkdir()
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    kafka = Kafka("kafka", ctx)
    kafka.path("config").mkdir(parents=True)
    kafka.initialise()
    cluster_arg = next(a for a in seen[0] if a.startswith("--cluster-id"))
    assert cluster_arg.startswith("--cluster-id=-")  # one argument, not a flag plus a value
