"""The services' one settings parser: what a user who mistyped a variable reads."""

import subprocess
import sys

import pytest

from order_services.settings import ConfigError, Env


def test_every_missing_variable_is_named_at_once():
    with pytest.raises(ConfigError) as info:
        Env({"A": "1", "B": ""}).require("A", "B", "C")
    assert "B, C" in str(info.value) and "docs/ORDER_FLOW.md" in str(info.value)


@pytest.mark.parametrize("value", ["x", "0", "70000", "-5", "8.5", " "])
def test_a_bad_port_names_the_variable_and_the_range(value):
    with pytest.raises(ConfigError, match=r"HTTP_PORT must be a whole number from 1 to 65535"):
        Env({"HTTP_PORT": value}).port("HTTP_PORT")


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_bad_seconds_are_refused(value):
    with pytest.raises(ConfigError, match="TRIGGER_SECONDS"):
        Env({"TRIGGER_SECONDS": value}).seconds("TRIGGER_SECONDS", 2)


def test_defaults_and_lists():
    env = Env({"N": "", "L": " a, b,,"})
    assert env.number("N", 1, 9, default=3) == 3 and env.seconds("S", 2.5) == 2.5
    assert env.names("L") == {"a", "b"} and env.text("T", "d") == "d"


@pytest.mark.parametrize("module,env,variable", [
    ("order_services.consumer", {"STORE": "postgres"}, "QUEUE"),
    ("order_services.consumer", {"STORE": "cassandra"}, "STORE"),
    ("order_services.cdc_bridge", {"METRICS_PORT": "x"}, "MONGODB_URL"),
    ("order_services.screening.stream", {}, "KAFKA_BOOTSTRAP"),
    ("order_services.stock_service", {"HTTP_HOST": "127.0.0.1", "HTTP_PORT": "http",
                                      "POSTGRES_HOST": "h", "POSTGRES_PORT": "1", "POSTGRES_DB": "d"}, "HTTP_PORT"),
    ("order_services.order_creator", {"WEB_CONCURRENCY": "many"}, "HTTP_HOST"),
])
def test_a_service_with_a_bad_setting_exits_2_naming_it_without_a_traceback(module, env, variable):
    result = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin", **env})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert variable in output and "Traceback" not in output
