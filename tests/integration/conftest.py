"""Real local servers, started once per test session through the real CLI.

The platform runs in a temporary working directory with every port picked free at
start, so the tests never collide with a platform a developer has running. Downloaded
artifacts are shared through $OPSCTL_CACHE_DIR (the repository's cache by default).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OPSCTL = [sys.executable, "-m", "opsctl"]


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(count: int, also: tuple[int, ...] = (), taken: set[int] | None = None,
               block: int = 1) -> list[int]:
    """Ports free now, below the kernel's ephemeral range: a port picked from that range (what
    binding port 0 gives) can be the local end of some client's connection by the time a
    server wants to listen on it, on a machine busy with connections. Each port p comes with
    p + a for every a in `also` and p .. p + block - 1 free too (and none in `taken`)."""
    import random

    top, ports, taken = _ephemeral_start() - 1, [], taken if taken is not None else set()
    while len(ports) < count:
        port = random.randint(10000, top - block - max(also, default=0))
        wanted = {p + a for p in range(port, port + block) for a in (0, *also)}
        if wanted & taken or not all(_free(p) for p in wanted):
            continue
        taken |= wanted
        ports.append(port)
    return ports


# The shared test platform's names, moved from platform.yaml's defaults like its ports, so
# that a test (or opsctl) that assumed a default name fails. NAMES: as loaded with them.
TEST_NAMES = {
    "realm": "opsctl-test-realm",
    "exchanges": {"orders": "t-order-exchange", "digital": "t-digital-order-exchange", "dead_letter": "t-orders-dlx"},
    "queues": {"priority": "t-priority-orders", "regular": "t-regular-orders", "digital": "t-digital-orders",
               "validation": "t-orders-validation", "dead_letter": "t-orders-dead-letter"},
    "topics": {"orders": "t-orders-topic"},
    "mongodb": {"database": "t_ecommerce", "orders": "t_orders", "digital_orders": "t_digital_orders"},
    "postgres": {"database": "t_orders"},
}


def _names_with(override: dict):
    from opsctl import spec

    default = yaml.safe_load(spec.DEFAULT_SPEC.read_text())
    return spec.Spec.model_validate(spec.deep_merge(default, {"names": override})).names


NAMES = _names_with(TEST_NAMES)


def port_override(components: list[str] | None = None) -> dict:
    """An opsctl.yaml body that moves every port of these components to a free one (of
    every component and service, and the names (TEST_NAMES), when none are named)."""
    from opsctl import spec

    default = yaml.safe_load(spec.DEFAULT_SPEC.read_text())
    base = default["components"]
    names = components or [n for n, c in base.items() if c.get("ports")]
    wanted = [(n, key) for n in names for key in base[n].get("ports", {})]
    taken: set[int] = set()
    ports = iter(free_ports(len(wanted), taken=taken))
    override: dict = {"components": {}}
    for name, key in wanted:
        override["components"].setdefault(name, {"ports": {}})["ports"][key] = next(ports)
    if not components:  # the whole platform: the services, each colour's mesh and the names move too
        offsets = default["mesh"]["port_offset"]
        services = default["services"]
        http = iter(free_ports(sum("port" in s for s in services.values()), taken=taken,
                               also=tuple(o for o in offsets.values() if o)))
        workers = iter(free_ports(sum("port" not in s for s in services.values()), taken=taken))
        override["services"] = {name: {"port": next(http)} if "port" in s else {"metrics_port": next(workers)}
                                for name, s in services.items()}
        blocks = iter(free_ports(len(offsets), taken=taken, block=spec.MESH_BLOCK))
        override["mesh"] = {"ports_from": {colour: next(blocks) for colour in offsets}}
        override["names"] = TEST_NAMES
    return override


LIVE_WORKDIRS: list["Workdir"] = []  # their servers' logs go into a failed test's report


class Workdir:
    """A working directory with its own opsctl.yaml, and a way to run the real CLI in it."""

    def __init__(self, path: Path, override: dict):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.write_config(override)
        LIVE_WORKDIRS.append(self)

    def logs(self) -> list[Path]:
        """Every log of its servers, services, jobs and supervisor, and of the tests' own
        service processes."""
        state = self.path / ".opsctl"
        found = {*state.glob("local/*/logs/*.log"), *state.glob("local/supervisor/*.log"),
                 *self.path.glob("*.log"), *self.path.glob("*/*.log")}  # and of tests' own servers
        return sorted(p for p in found if p.is_file())

    def remove(self) -> None:
        """Purge its servers and delete it; the logs of a failed test are kept first."""
        self.run("down", "--purge", "--yes", timeout=300)
        LIVE_WORKDIRS.remove(self)
        shutil.rmtree(self.path, ignore_errors=True)

    def write_config(self, override: dict) -> None:
        self.config = override
        (self.path / "opsctl.yaml").write_text(yaml.safe_dump(override))

    def port(self, component: str, key: str) -> int:
        return self.config["components"][component]["ports"][key]

    @property
    def spec(self):
        """The loaded spec, opsctl.yaml's overrides included."""
        return workdir_context(self).spec

    @property
    def names(self):
        """The names of the loaded spec (realm, queues, databases)."""
        return self.spec.names

    def admin_secret(self, component: str, key: str) -> str:
        """A generated admin credential of this platform (never printed by opsctl)."""
        return json.loads((self.path / ".opsctl" / "secrets.json").read_text())[component][key]

    def amqp(self, **params):
        """A pika connection to this platform's RabbitMQ as its admin user."""
        import pika

        return pika.BlockingConnection(pika.ConnectionParameters(
            host="127.0.0.1", port=self.port("rabbitmq", "amqp"),
            credentials=pika.PlainCredentials("opsctl-admin", self.admin_secret("rabbitmq", "admin_password")),
            **params))

    def run(self, *args: str, timeout: float = 600, check_json: bool = False, stdin: str | None = None,
            env: dict[str, str] | None = None):
        env = {**os.environ, "OPSCTL_CACHE_DIR": cache_dir(), "PYTHONUNBUFFERED": "1", **(env or {})}
        for name in ("OPSCTL_CONFIG", "VAULT_TOKEN"):
            env.pop(name, None)
        result = subprocess.run([*OPSCTL, *args], cwd=self.path, env=env, capture_output=True,
                                text=True, timeout=timeout, input=stdin,
                                stdin=None if stdin is not None else subprocess.DEVNULL)
        result.json = json.loads(result.stdout) if check_json else None
        return result

    def steps(self, *args: str) -> tuple[int, dict]:
        """Run `install -o json ARGS`; returns (exit code, {step name: result})."""
        result = self.run("install", "-o", "json", *args, check_json=True)
        return result.returncode, {s["name"]: s for s in result.json["steps"]}

    def status(self) -> tuple[int, dict]:
        result = self.run("status", "-o", "json", check_json=True)
        return result.returncode, {c["component"]: c for c in result.json["components"]}


def cache_dir() -> str:
    return os.environ.get("OPSCTL_CACHE_DIR", str(REPO / ".opsctl" / "cache"))


def reachable_dir(prefix: str) -> Path:
    """A fresh folder that the servers' system users can enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def platform():
    """The whole local platform, installed once; torn down (purged) at the end.

    Without the bundled services running: tests that need them start them (and stop them
    after), so that the others can read the queues themselves. Tests that run install on
    it pass --skip services for the same reason."""
    work = Workdir(reachable_dir("opsctl-platform-"), port_override())
    code, steps = work.steps("--skip", "services")
    work.first_install = (code, steps)
    yield work
    work.remove()


@pytest.fixture
def workdir():
    """A second, empty working directory (ports free) for tests that need their own servers."""
    work = Workdir(reachable_dir("opsctl-work-"), port_override())
    yield work
    work.remove()


KEPT_LOGS = REPO / ".opsctl" / "test-logs"  # git-ignored
TAIL_LINES = 25


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report ends with the last lines of every log of the platforms it
    used, and the logs are copied to .opsctl/test-logs/<test>/ before any purge."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed or not LIVE_WORKDIRS:
        return
    kept = KEPT_LOGS / item.nodeid.replace("/", "_").replace("::", "-")[:150]
    tails = []
    for work in LIVE_WORKDIRS:
        for log in work.logs():
            relative = log.relative_to(work.path)
            try:
                lines = log.read_text(errors="replace").rstrip().splitlines()
                (kept / work.path.name / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, kept / work.path.name / relative)
            except OSError:
                continue
            if lines:
                tails.append(f"--- {work.path.name}/{relative} (last {min(TAIL_LINES, len(lines))} "
                             f"of {len(lines)} lines)\n" + "\n".join(lines[-TAIL_LINES:]))
    if tails:
        report.sections.append(("server logs", f"all of them in {kept}\n" + "\n".join(tails)))


def workdir_context(work: Workdir):
    """opsctl's run context for a working directory, as the CLI would build it there."""
    from opsctl import spec
    from opsctl.context import Context

    loaded = spec.load(str(work.path / "opsctl.yaml"))
    return Context(loaded, "local", work.path / ".opsctl")


def components_where(work: Workdir, on_local: bool) -> list[str]:
    """The loaded spec's components that run as servers on the local target (`on_local`),
    or that are for other targets only."""
    spec = workdir_context(work).spec
    if not on_local:
        return [name for name, c in spec.ordered() if "local" not in c.targets]
    return [name for name, c in spec.ordered() if "local" in c.targets and c.available and c.ports]


def service_env(work: Workdir, name: str) -> dict[str, str]:
    """The environment `opsctl services start` gives service `name` (docs/ORDER_FLOW.md)."""
    from opsctl.components import keycloak_realm, services

    ctx = workdir_context(work)
    os.environ.pop("VAULT_TOKEN", None)
    return services.environment(ctx, name, keycloak_realm.client_secret(ctx, name))
