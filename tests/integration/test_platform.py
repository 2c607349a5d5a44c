"""install, status, re-install, repair and down against the real local servers."""

import os
import signal
import socket
import time

import pytest
import yaml

from tests.integration.conftest import components_where, workdir_context
from tests.integration.helpers import process_of, wait_for

pytestmark = pytest.mark.integration


def test_first_install_starts_every_local_server(platform):
    code, steps = platform.first_install
    assert code == 0, steps
    servers = components_where(platform, on_local=True)
    assert "rabbitmq" in servers and "spark" not in servers  # a library there, not a server
    for name in servers:
        assert steps[name]["state"] == "changed", steps[name]
        assert "started" in steps[name]["detail"]
    for name in components_where(platform, on_local=False):
        assert steps[name] == {**steps[name], "state": "skipped", "detail": "kubernetes only"}
    assert steps["spark"]["state"] in ("changed", "unchanged") and "pyspark" in steps["spark"]["detail"]
    assert steps["airflow"]["state"] == "skipped" and "not yet" in steps["airflow"]["detail"]
    assert [s["number"] for s in steps.values()] == list(range(1, 23))  # 16 components, 6 config
    assert "initialised" in steps["vault"]["detail"] and "unsealed" in steps["vault"]["detail"]


def test_the_platform_installs_with_every_port_and_the_realm_moved_in_opsctl_yaml(platform):
    """The shared test platform is itself the proof: opsctl.yaml moves every port of every
    component and service, the realm, the queues, exchanges, topic and databases away from
    platform.yaml's, and everything works there."""
    from opsctl import spec

    default = yaml.safe_load(spec.DEFAULT_SPEC.read_text())
    moved = platform.config
    for name, component in default["components"].items():
        for key, port in component.get("ports", {}).items():
            assert moved["components"][name]["ports"][key] != port, f"{name}.{key} is not moved"
    for name, service in default["services"].items():
        field = "port" if "port" in service else "metrics_port"
        assert moved["services"][name][field] != service[field], f"services.{name} is not moved"
    for colour, first in default["mesh"]["ports_from"].items():
        assert moved["mesh"]["ports_from"][colour] != first, f"mesh.ports_from.{colour} is not moved"
    names = platform.names
    assert names.realm != default["names"]["realm"]
    for group in ("queues", "exchanges", "topics"):
        for key, name in default["names"][group].items():
            assert getattr(getattr(names, group), key) != name, f"names.{group}.{key} is not moved"
    assert names.mongodb.database != default["names"]["mongodb"]["database"]
    assert names.postgres.database != default["names"]["postgres"]["database"]
    assert platform.first_install[0] == 0
    claims = platform.run("token", "-o", "json", "--decode", check_json=True).json["claims"]
    assert claims["iss"].endswith(f":{moved['components']['keycloak']['ports']['http']}/realms/{platform.names.realm}")


def test_status_shows_every_server_healthy_with_endpoint_and_version(platform):
    comps = platform.status()[1]
    # Whether the bundled services count (and the exit code with them) depends on what
    # earlier tests did with them on this shared platform: tests/integration/test_supervision.py.
    from opsctl.components.services import every_instance

    assert len(comps) == 16 + len(every_instance(workdir_context(platform)))  # each colour's copy too
    for name in components_where(platform, on_local=True):
        assert comps[name]["health"] == "healthy", comps[name]
        assert comps[name]["version"], comps[name]
        assert comps[name]["target"] == "local"
    assert str(platform.port("rabbitmq", "amqp")) in comps["rabbitmq"]["endpoint"]
    assert comps["kafka"]["version"].startswith("4.3")
    assert comps["mongodb"]["detail"] == "replica set rs0, primary"
    assert comps["vault"]["detail"] == "initialised, unsealed"
    for name in components_where(platform, on_local=False):
        assert comps[name]["health"] == "n/a"


def test_servers_listen_on_loopback_only(platform):
    """Each server answers on 127.0.0.1 and on no other address of this machine."""
    others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    others.discard("127.0.0.1")
    for name in components_where(platform, on_local=True):
        for key, port in platform.config["components"][name]["ports"].items():
            if key == "cluster":  # vault's cluster port is only opened by an HA leader
                continue
            for address in others:
                with socket.socket() as s:
                    s.settimeout(0.5)
                    assert s.connect_ex((address, port)) != 0, f"{name} {key} open on {address}"


def test_second_install_changes_nothing(platform):
    code, steps = platform.steps("--skip", "services")
    assert code == 0
    assert {s["state"] for n, s in steps.items()} <= {"unchanged", "skipped"}, steps


def test_dry_run_on_installed_platform_plans_nothing(platform):
    code, steps = platform.steps("--dry-run", "--skip", "services")
    assert code == 0
    assert not [n for n, s in steps.items() if s["state"] == "planned"]


def test_secrets_file_is_private_and_secrets_are_not_printed(platform):
    secrets = platform.path / ".opsctl" / "secrets.json"
    assert oct(secrets.stat().st_mode & 0o777) == "0o600"
    assert oct((platform.path / ".opsctl" / "vault-init.json").stat().st_mode & 0o777) == "0o600"
    import json

    values = [v for comp in json.loads(secrets.read_text()).values() for v in comp.values()]
    status = platform.run("status")
    install = platform.run("install", "--skip", "services")
    for value in values:
        assert value not in status.stdout + status.stderr + install.stdout + install.stderr


def _pid(platform, name: str) -> int:
    from opsctl.components import build

    return process_of(build(name, workdir_context(platform))).pid()


def _stop(platform, name: str, sig: int) -> None:
    """Signal a server and wait until it is gone."""
    pid = _pid(platform, name)
    os.kill(pid, sig)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:  # gone, or a zombie nobody reaps (this sandbox's init does not)
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):  # gone while /proc was read
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} (pid {pid}) did not exit")


def test_killed_server_is_restarted_by_the_supervisor_and_counted(platform):
    first = _pid(platform, "redis")
    _stop(platform, "redis", signal.SIGKILL)
    wait_for(lambda: _pid(platform, "redis") not in (None, first)
             and platform.status()[1]["redis"]["health"] == "healthy", 30,
             interval=0.2, what="redis restarted by the supervisor")
    code, comps = platform.status()
    assert comps["redis"]["health"] == "healthy" and comps["redis"]["restarts"] == 1
    assert "exited unexpectedly" in comps["redis"]["last_error"]


def test_stopped_server_is_reported_then_repaired_alone(platform):
    from opsctl.components import build

    assert build("redis", workdir_context(platform)).stop()  # stopped: not restarted
    code, comps = platform.status()
    assert code == 3
    assert comps["redis"]["health"] == "stopped"
    code, steps = platform.steps("--skip", "services")
    assert code == 0
    assert steps["redis"]["state"] == "changed"
    servers = components_where(platform, on_local=True)
    assert {s["state"] for n, s in steps.items() if n in servers and n != "redis"} == {"unchanged"}
    assert {platform.status()[1][name]["health"] for name in servers} == {"healthy"}


def _vault(platform, method: str, path: str, body=None):
    import json

    from opsctl import httpclient

    token = json.loads((platform.path / ".opsctl" / "vault-admin.json").read_text())["token"]
    url = f"http://127.0.0.1:{platform.port('vault', 'http')}/v1/{path}"
    return httpclient.request(method, url, body=body, headers={"X-Vault-Token": token})[2]


def test_restarted_vault_comes_back_unsealed_with_its_data(platform):
    _vault(platform, "POST", "cubbyhole/opsctl-test", {"kept": "yes"})
    _stop(platform, "vault", signal.SIGTERM)
    code, comps = platform.status()
    assert comps["vault"]["health"] == "stopped"
    code, steps = platform.steps("--only", "vault")
    assert code == 0
    assert steps["vault"]["detail"].startswith("started, unsealed")  # not initialised again
    assert platform.status()[1]["vault"]["detail"] == "initialised, unsealed"
    assert _vault(platform, "GET", "cubbyhole/opsctl-test")["data"] == {"kept": "yes"}


def test_changed_port_reloads_only_that_server(platform):
    from tests.integration.conftest import free_ports

    config = platform.config
    new_port = free_ports(1)[0]
    config["components"]["nginx"]["ports"]["http"] = new_port
    platform.write_config(config)
    code, steps = platform.steps("--only", "nginx,3,prometheus-grafana")
    assert code == 0
    assert list(steps) == ["nginx", "prometheus-grafana"]
    # nginx rereads its files on SIGHUP: a new port is a graceful reload, no restart.
    assert steps["nginx"]["state"] == "changed" and "reloaded" in steps["nginx"]["detail"]
    assert steps["prometheus-grafana"]["state"] == "unchanged"
    assert platform.status()[1]["nginx"]["endpoint"] == f"127.0.0.1:{new_port}"


def test_port_in_use_is_reported_with_component_and_fix(workdir):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", workdir.port("redis", "redis")))
        blocker.listen()
        result = workdir.run("install", "--only", "redis")
    assert result.returncode == 1
    assert f"redis cannot listen on 127.0.0.1:{workdir.port('redis', 'redis')}" in result.stderr
    assert "opsctl.yaml" in result.stderr and "ports: {redis: <free port>}" in result.stderr
    assert "Traceback" not in result.stderr


def test_interrupted_install_leaves_consistent_state_and_resumes(workdir):
    import json
    import subprocess
    import sys

    from tests.integration.conftest import cache_dir

    env = {**os.environ, "OPSCTL_CACHE_DIR": cache_dir()}
    proc = subprocess.Popen([sys.executable, "-m", "opsctl", "install", "--only", "redis,keycloak"],
                            cwd=workdir.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    state_file = workdir.path / ".opsctl" / "state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until redis is done and keycloak is starting
        if state_file.exists() and "redis" in json.loads(state_file.read_text()).get("steps", {}):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = json.loads(state_file.read_text())
    assert state["run"]["result"] == "interrupted"
    assert state["steps"]["redis"]["state"] == "changed"
    assert state["steps"]["keycloak"]["state"] == "interrupted"

    result = workdir.run("install", "--only", "redis,keycloak")
    assert result.returncode == 0, result.stderr
    assert "resuming after the interrupted run" in result.stderr
    code, steps = workdir.steps("--only", "redis,keycloak")
    assert {s["state"] for s in steps.values()} == {"unchanged"}


def test_down_stops_everything_and_purge_asks_first(workdir):
    code, steps = workdir.steps("--only", "redis,nginx")
    assert code == 0
    refused = workdir.run("down", "--purge")  # no terminal to confirm on, no --yes
    assert refused.returncode == 2 and "nothing was deleted" in refused.stderr
    assert (workdir.path / ".opsctl" / "local" / "redis").exists()
    assert workdir.status()[1]["redis"]["health"] == "healthy"  # refusing stopped nothing

    down = workdir.run("down", "-o", "json", check_json=True)
    assert down.returncode == 0
    assert set(down.json["stopped"]) == {"redis", "nginx"}
    code, comps = workdir.status()
    assert code == 3 and comps["redis"]["health"] == "stopped"
    with socket.socket() as s:
        s.bind(("127.0.0.1", workdir.port("redis", "redis")))  # the port is free again

    purged = workdir.run("down", "--purge", "--yes")
    assert purged.returncode == 0
    assert not (workdir.path / ".opsctl" / "local").exists()
