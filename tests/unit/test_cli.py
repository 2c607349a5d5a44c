"""The CLI as a user meets it, without servers: help, errors, exit codes, dry-run."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def opsctl(cwd, *args, env=None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("OPSCTL_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "opsctl", *args], cwd=cwd, capture_output=True,
                          text=True, env=full_env, stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture
def cwd():
    """A fresh folder the postgres system user can enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="opsctl-cli-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_help_lists_command_groups_and_exit_codes(cwd):
    result = opsctl(cwd, "--help")
    assert result.returncode == 0
    for word in ("install", "status", "down", "config", "Exit codes", "3 unhealthy"):
        assert word in result.stdout


def test_every_command_offers_json_output(cwd):
    for command in (["install"], ["status"], ["down"], ["fetch"], ["config", "view"],
                    ["config", "validate"]):
        assert "--output" in opsctl(cwd, *command, "--help").stdout, command


def test_bad_override_file_is_exit_2_with_field_path_and_no_traceback(cwd):
    (cwd / "opsctl.yaml").write_text("components:\n  redis:\n    ports: {redis: -1}\n")
    result = opsctl(cwd, "install", "--dry-run")
    assert result.returncode == 2
    assert "opsctl.yaml: components.redis.ports.redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_file_error_as_json(cwd):
    (cwd / "opsctl.yaml").write_text("platform: [oops\n")
    result = opsctl(cwd, "status", "-o", "json")
    assert result.returncode == 2
    assert "invalid YAML" in json.loads(result.stdout)["error"]["message"]


def test_unknown_step_lists_the_valid_ones(cwd):
    result = opsctl(cwd, "install", "--only", "zookeeper", "--dry-run")
    assert result.returncode == 2
    assert "unknown step 'zookeeper'" in result.stderr and "13 kafka" in result.stderr


def test_unknown_option_value_is_a_usage_error(cwd):
    assert opsctl(cwd, "status", "--output", "xml").returncode == 2
    assert opsctl(cwd, "install", "--target", "docker", "--dry-run").returncode == 2


def test_kubernetes_target_without_a_cluster_is_refused_clearly(cwd):
    result = opsctl(cwd, "install", "--target", "kubernetes", "--kubeconfig", str(cwd / "none"), "--dry-run")
    assert result.returncode == 2 and f"no kubeconfig at {cwd / 'none'}" in result.stderr
    assert "--kubeconfig" in result.stderr and list(cwd.iterdir()) == []


def test_dry_run_on_fresh_directory_plans_every_server_and_writes_nothing(cwd):
    result = opsctl(cwd, "install", "--dry-run", "-o", "json")
    assert result.returncode == 0, result.stderr
    steps = {s["name"]: s for s in json.loads(result.stdout)["steps"]}
    assert steps["rabbitmq"]["state"] == "planned" and steps["rabbitmq"]["detail"] == "start"
    assert steps["kind"]["state"] == "skipped"
    assert list(cwd.iterdir()) == []


def test_only_from_and_skip_select_steps(cwd):
    result = opsctl(cwd, "install", "--dry-run", "-o", "json", "--from", "12", "--only", "redis,kafka,5")
    names = [s["name"] for s in json.loads(result.stdout)["steps"]]
    assert names == ["redis", "kafka"]
    result = opsctl(cwd, "install", "--dry-run", "-o", "json", "--from", "20", "--skip", "services,21,consul-config")
    assert [s["name"] for s in json.loads(result.stdout)["steps"]] == ["rabbitmq-topology"]


def test_status_of_nothing_installed_is_unhealthy(cwd):
    result = opsctl(cwd, "status", "-o", "json")
    assert result.returncode == 3
    comps = {c["component"]: c for c in json.loads(result.stdout)["components"]}
    assert comps["redis"]["detail"] == "not installed"


def test_config_view_merges_override(cwd):
    (cwd / "opsctl.yaml").write_text("names:\n  realm: my-realm\n")
    result = opsctl(cwd, "config", "view", "-o", "json")
    assert json.loads(result.stdout)["names"]["realm"] == "my-realm"
    assert "with" in opsctl(cwd, "config", "validate").stderr


def test_down_purge_without_confirmation_deletes_nothing(cwd):
    (cwd / ".opsctl" / "local" / "redis").mkdir(parents=True)
    result = opsctl(cwd, "down", "--purge")
    assert result.returncode == 2
    assert (cwd / ".opsctl" / "local" / "redis").exists()


def test_missing_java_is_reported_with_the_install_command(cwd):
    result = opsctl(cwd, "install", "--only", "kafka", env={"PATH": str(cwd / "empty-bin")})
    assert result.returncode == 1
    assert "java is not installed" in result.stderr
    assert "apt-get install -y openjdk-17-jre-headless" in result.stderr


def test_missing_maven_is_reported_when_an_artifact_must_be_fetched(cwd):
    import shutil as sh

    bin_dir = cwd / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(sh.which("java"))
    result = opsctl(cwd, "install", "--only", "keycloak",
                    env={"PATH": str(bin_dir), "OPSCTL_CACHE_DIR": str(cwd / "empty-cache")})
    assert result.returncode == 1
    assert "mvn is not installed" in result.stderr and "apt-get install -y maven" in result.stderr
    assert not list((cwd / "empty-cache").glob("keycloak-*"))  # nothing half-made


@pytest.mark.parametrize("args, message", [
    (["--master", "yarn"], "'yarn' is not a Spark master URL"),
    (["--master", "spark://host-without-port"], "not a Spark master URL"),
    (["--conf", "executor.memory=2g"], "expected KEY=VALUE"),
    (["--conf", "spark.master=local"], "give the master with --master"),
])
def test_stream_start_on_a_bad_master_or_property_is_exit_2_before_anything_runs(cwd, args, message):
    result = opsctl(cwd, "jobs", "stream", "start", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert "spark://HOST:PORT" in result.stderr or "--conf" in result.stderr
    assert not (cwd / ".opsctl" / "local").exists()


def test_non_loopback_bind_address_is_exit_2_and_says_what_to_do(cwd):
    (cwd / "opsctl.yaml").write_text("platform:\n  bind_address: 0.0.0.0\n")
    result = opsctl(cwd, "install", "--dry-run")
    assert result.returncode == 2
    assert "bind_address '0.0.0.0' is not a loopback address" in result.stderr
    assert "use 127.0.0.1" in result.stderr and "Traceback" not in result.stderr
    assert not (cwd / ".opsctl").exists()  # refused before anything was written


def test_commands_print_only_through_ui():
    """One place prints (opsctl/ui.py): what a command shows follows --output and the terminal."""
    import ast

    offenders = []
    for path in sorted((Path(__file__).parents[2] / "opsctl" / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.name}:{node.lineno} print()")
            if isinstance(node, ast.Attribute) and node.attr in ("console", "err_console") \
                    and isinstance(node.value, ast.Name) and node.value.id == "ui":
                offenders.append(f"{path.name}:{node.lineno} ui.{node.attr}")
    assert not offenders, offenders


# --- the conventions of kubectl, helm and gh, at the root ---------------------------------
@pytest.mark.parametrize("shell,marker", [("bash", "complete_bash"), ("zsh", "compdef"), ("fish", "complete_fish")])
def test_completion_prints_a_script_for_each_shell(cwd, shell, marker):
    result = opsctl(cwd, "completion", shell)
    assert result.returncode == 0 and marker in result.stdout and "_OPSCTL_COMPLETE" in result.stdout
    assert result.stderr == ""


def test_the_completion_script_completes_commands_and_service_names(cwd):
    def complete(words: str) -> list[str]:
        result = opsctl(cwd, env={"_OPSCTL_COMPLETE": "complete_bash", "COMP_WORDS": words,
                                  "COMP_CWORD": str(len(words.split()) - 1)})
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert "services" in complete("opsctl ser")
    assert {"start", "stop", "status"} <= set(complete("opsctl services st"))
    assert "regular-consumer" in complete("opsctl services logs reg")


def test_an_unknown_shell_is_a_usage_error(cwd):
    result = opsctl(cwd, "completion", "tcsh")
    assert result.returncode == 2 and "bash" in result.stderr


def unreachable(cwd) -> None:
    """An opsctl.yaml whose servers nobody listens on (a free port), so nothing is reached."""
    import socket

    sockets = [socket.socket() for _ in range(3)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    rabbitmq, vault, keycloak = (s.getsockname()[1] for s in sockets)
    for s in sockets:
        s.close()
    (cwd / "opsctl.yaml").write_text(
        f"components:\n  rabbitmq: {{ports: {{management: {rabbitmq}}}}}\n  vault: {{ports: {{http: {vault}}}}}\n"
        f"  keycloak: {{ports: {{http: {keycloak}}}}}\n")


@pytest.mark.parametrize("group", ["queues", "keycloak", "vault"])
def test_a_diff_that_cannot_compare_exits_2_so_that_1_always_means_drift(cwd, group):
    unreachable(cwd)
    result = opsctl(cwd, group, "diff", "-o", "json")
    assert result.returncode == 2, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["exit_code"] == 2 and "not reachable" in error["message"] + error["hint"] or \
        "connect" in error["message"], error


def test_quiet_leaves_only_errors_on_stderr_and_no_color_plain_text(cwd):
    (cwd / "opsctl.yaml").write_text("components:\n  rabbitmq:\n    ports: {amqp: 5999}\n")
    loud = opsctl(cwd, "config", "validate")
    quiet = opsctl(cwd, "-q", "config", "validate")
    assert loud.returncode == quiet.returncode == 0
    assert quiet.stdout == loud.stdout and "valid" in loud.stderr and quiet.stderr == ""
    unreachable(cwd)
    for args, env in ((["--no-color"], {}), ([], {"NO_COLOR": "1"})):
        failed = opsctl(cwd, *args, "queues", "diff", env={"FORCE_COLOR": "1", "TERM": "xterm", **env})
        assert failed.returncode == 2 and "error:" in failed.stderr
        assert "\x1b[" not in failed.stderr, args or env
    coloured = opsctl(cwd, "queues", "diff", env={"FORCE_COLOR": "1", "TERM": "xterm"})
    assert "\x1b[" in coloured.stderr  # the control: colour is on unless turned off
