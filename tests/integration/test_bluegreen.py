"""opsctl bluegreen on the real local platform: the edge moves between the colours under
load without failing a request or losing an order; a colour that fails its gate never gets
traffic; Ctrl-C leaves the edge on one colour, the one status names."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid

import httpx
import psycopg
import pytest

from tests.integration.conftest import NAMES, OPSCTL, cache_dir, workdir_context
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def colours(platform):
    """Both colours' services running, blue live; afterwards the idle colour runs the working
    tree again and blue is live."""
    code, steps = platform.steps("--only", "services")
    assert code == 0, steps
    yield platform
    again = platform.run("bluegreen", "deploy")
    assert again.returncode == 0, again.stdout + again.stderr
    if live(platform) != "blue":
        back = platform.run("bluegreen", "switch", "--to", "blue", "--yes", "--analysis-seconds", "2")
        assert back.returncode == 0, back.stdout + back.stderr
    platform.run("services", "stop")


def live(platform) -> str:
    return platform.run("bluegreen", "status", "-o", "json", check_json=True).json["live"]


def edge_colour(platform) -> str:
    from opsctl.components.nginx import edge_url

    return httpx.get(f"{edge_url(workdir_context(platform))}/healthz", timeout=5).headers["X-Colour"]


def switch(platform, *args: str):
    return platform.run("bluegreen", "switch", "--yes", "--analysis-seconds", "3", "-o", "json", *args,
                        check_json=True)


class EdgeLoad:
    """Priority orders through the edge at `rate` per second from `clients` clients, each on
    its own kept-alive connection, each order with its Idempotency-Key and one try: every
    answer that is not 201 is a failed request (a reset kept connection too)."""

    def __init__(self, platform, rate: float, clients: int = 1):
        from opsctl.components.nginx import edge_url

        token = platform.run("token", "-o", "json", check_json=True).json["access_token"]
        self.url, self.headers, self.rate = f"{edge_url(workdir_context(platform))}/orders", {
            "Authorization": f"Bearer {token}"}, rate
        self.accepted: list[str] = []
        self.failed: list[str] = []
        self.colours: set[str] = set()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(rate / clients,), daemon=True)
                        for _ in range(clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def _send(self, rate: float) -> None:
        order = {"customer": {"id": "bluegreen", "name": "Load"}, "type": "priority",
                 "items": [{"product": "Tea", "category": "grocery", "quantity": 1, "price": 10.0}]}
        with httpx.Client(timeout=10) as client:
            started, sent = time.monotonic(), 0
            while not self.done.is_set():
                try:
                    answer = client.post(self.url, json=order,
                                         headers={**self.headers, "Idempotency-Key": str(uuid.uuid4())})
                    if answer.status_code == 201:
                        self.accepted.append(answer.json()["order_id"])
                        self.colours.add(answer.headers["X-Colour"])
                    else:
                        self.failed.append(f"{answer.status_code} {answer.text[:100]}")
                except httpx.HTTPError as e:
                    self.failed.append(repr(e))
                sent += 1
                time.sleep(max(0.0, started + sent / rate - time.monotonic()))


def _edge_processes(ctx) -> set[int]:
    """nginx's master and workers: a reload would replace the workers."""
    from opsctl.components import build
    from tests.integration.helpers import process_of

    master = process_of(build("nginx", ctx)).pid()
    found = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return {master, *map(int, found)}


def test_switches_under_load_fail_no_request_and_lose_no_order(colours):
    from opsctl.components.mesh import agent

    ctx = workdir_context(colours)
    edge = _edge_processes(ctx)
    load = EdgeLoad(colours, rate=60, clients=4)
    load.start()
    try:
        wait_for(lambda: len(load.accepted) > 40, 30, what="orders through the edge")
        for to in ("green", "blue", "green"):
            result = switch(colours)
            assert result.returncode == 0, result.json
            assert result.json["to"] == to and result.json["switched"] and not result.json["rolled_back"]
            assert [c["check"] for c in result.json["checks"]] == [
                "health", "smoke order", "pre-switch analysis", "post-switch analysis"]
            assert live(colours) == edge_colour(colours) == to
    finally:
        load.done.set()
        load.join(30)
    assert load.failed == [] and load.colours == {"blue", "green"}
    assert _edge_processes(ctx) == edge  # the switch is behind nginx: nginx is not even reloaded
    # Every accepted order stored once; the workers run once, on the live colour's datacenter.
    with psycopg.connect(host="127.0.0.1", port=colours.port("postgres", "postgres"), user="postgres",
                         password=colours.admin_secret("postgres", "password"), dbname=NAMES.postgres.database) as conn:
        wait_for(lambda: conn.execute("SELECT count(*) FROM priority_orders WHERE order_id = ANY(%s)",
                                      [load.accepted]).fetchone()[0] == len(load.accepted),
                 120, what=f"{len(load.accepted)} orders in PostgreSQL")
    for colour, registered in (("green", True), ("blue", False)):
        services = agent(ctx, colour).api("GET", "agent/services")
        assert ("premium-consumer" in services) is registered, (colour, sorted(services))
    status = colours.run("bluegreen", "status", "-o", "json", check_json=True)
    assert status.returncode == 0, status.json
    history = status.json["history"]
    assert [(h["previous"], h["colour"]) for h in history[:3]] == [("blue", "green"), ("green", "blue"), ("blue", "green")]
    print(f"\n3 switches under {load.rate:g} orders/s: {len(load.accepted)} accepted, {len(load.failed)} failed")


def _critical(ctx, colour: str, service: str) -> bool:
    from opsctl import httpclient
    from opsctl.components.mesh import agent

    try:
        agent(ctx, colour).api("GET", f"agent/health/service/id/{service}")
        return False
    except httpclient.HTTPError as e:
        return e.status == 503


def test_a_colour_that_fails_its_gate_gets_no_traffic(colours):
    from opsctl.components.services import BundledService

    ctx = workdir_context(colours)
    before, idle = live(colours), "blue" if live(colours) == "green" else "green"
    broken = BundledService("order-creator", ctx, colour=idle)
    ctx.runtime.stop(broken)  # the order API of the idle colour is down; its sidecar is up
    try:
        wait_for(lambda: _critical(ctx, idle, "order-creator"), 30, interval=0.2, what="Consul to see it down")
        result = switch(colours)
        assert result.json["switched"] is False and result.json["failed"] == "health"
        assert result.returncode == 1 and "order-creator critical" in result.json["checks"][0]["detail"]
        assert live(colours) == edge_colour(colours) == before
    finally:
        started = colours.run("services", "start", "order-creator", "--colour", idle)
        assert started.returncode == 0, started.stdout + started.stderr
    gone = colours.run("bluegreen", "switch", "--to", before, "--yes")
    assert gone.returncode == 2 and f"{before} is live already" in gone.stderr


def test_ctrl_c_during_a_switch_leaves_the_edge_on_the_colour_status_names(colours):
    import os

    env = {**os.environ, "OPSCTL_CACHE_DIR": cache_dir()}
    before = live(colours)

    def interrupted(when) -> subprocess.CompletedProcess:
        proc = subprocess.Popen([*OPSCTL, "bluegreen", "switch", "--yes", "--analysis-seconds", "8"],
                                cwd=colours.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)
        when()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    during_gate = interrupted(lambda: time.sleep(4))  # in the pre-switch analysis
    assert during_gate.returncode == 130 and "nothing changed" in during_gate.stderr, during_gate.stderr
    assert live(colours) == edge_colour(colours) == before
    other = "blue" if before == "green" else "green"
    during_watch = interrupted(lambda: wait_for(lambda: edge_colour(colours) == other, 60, interval=0.05,
                                                what="the switch"))
    assert during_watch.returncode == 130 and "switched back" in during_watch.stderr, during_watch.stderr
    assert live(colours) == edge_colour(colours) == before


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A temporary clone of this repository, to commit builds in."""
    from tests.integration.conftest import REPO

    path = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(path)], check=True, timeout=120)
    return path


def commit(clone, change: str, message: str) -> str:
    """A commit in the clone whose order API runs `change` first in every POST /orders."""
    api = clone / "services" / "order_services" / "order_api.py"
    text = subprocess.run(["git", "-C", str(clone), "show", "origin/HEAD:services/order_services/order_api.py"],
                          capture_output=True, text=True, check=True).stdout
    anchor = "        order_id = str(uuid.uuid4())\n        again = None\n"
    assert anchor in text
    api.write_text(text.replace(anchor, f"        {change}\n{anchor}", 1))
    git = ["git", "-C", str(clone), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "commit", "-qam", message], check=True)
    return subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def deploy(platform, clone, ref: str) -> str:
    """Deploy `ref` of the clone to the idle colour; that colour."""
    done = platform.run("bluegreen", "deploy", "--source", str(clone), "--ref", ref, "-o", "json", check_json=True)
    assert done.returncode == 0, done.json
    status = platform.run("bluegreen", "status", "-o", "json", check_json=True).json
    (idle,) = [c for c in status["colours"] if not c["live"]]
    assert idle["colour"] == done.json["colour"] and idle["version"].startswith(ref) and idle["healthy"]
    return idle["colour"]


def switch_under_load(platform, rate: float = 20):
    """A switch while EdgeLoad runs: its result and the load."""
    load = EdgeLoad(platform, rate=rate)
    load.start()
    try:
        return switch(platform), load
    finally:
        load.done.set()
        load.join(30)


def test_a_broken_build_is_stopped_by_the_gate_and_users_never_see_it(colours, clone):
    before = live(colours)
    broken = commit(clone, 'raise RuntimeError("a broken build")', "break the order API")
    refused = colours.run("bluegreen", "deploy", "--colour", before)
    assert refused.returncode == 2 and "never touches the live colour" in refused.stderr
    target = deploy(colours, clone, broken)
    result, load = switch_under_load(colours)
    assert result.returncode == 1 and not result.json["switched"] and result.json["failed"] == "smoke order"
    assert "answered 500" in result.json["checks"][1]["detail"], result.json
    assert live(colours) == edge_colour(colours) == before != target
    assert load.accepted and load.failed == [] and load.colours == {before}


def test_a_build_that_fails_only_under_live_traffic_is_rolled_back_by_the_watch(colours, clone):
    """Priority orders fail in this build: the gate's smoke order (regular) and its read-only
    analysis pass, the switch happens, the live priority traffic fails, the watch sees it and
    the edge goes back."""
    before = live(colours)
    flaky = commit(clone, 'if order.type == "priority": raise RuntimeError("fails under live traffic")',
                   "break priority orders")
    target = deploy(colours, clone, flaky)
    result, load = switch_under_load(colours)
    assert result.returncode == 1 and result.json["switched"] and result.json["rolled_back"], result.json
    assert [c["ok"] for c in result.json["checks"]] == [True, True, True, False]
    assert "5xx" in result.json["checks"][-1]["detail"]
    assert live(colours) == edge_colour(colours) == before
    history = colours.run("bluegreen", "status", "-o", "json", check_json=True).json["history"]
    assert history[0]["reason"].startswith("rolled back") and history[1]["colour"] == target
    assert load.failed  # some users saw it, for the watch's few seconds
