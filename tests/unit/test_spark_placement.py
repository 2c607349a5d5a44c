"""Where the streaming job runs: the master and Spark properties `opsctl jobs stream start`
keeps, and the driver environment built from them."""

import shlex

import pytest

from opsctl import spec
from opsctl.components import spark
from opsctl.context import Context
from opsctl.errors import UsageError


@pytest.fixture
def ctx(tmp_path):
    return Context(spec.load(None), "local", tmp_path / ".opsctl")


@pytest.mark.parametrize("master", ["local", "local[*]", "local[4]", "local[*,3]", "spark://10.0.0.5:7077",
                                    "spark://m1:7077,m2.example.org:7077", "k8s://https://10.0.0.1:6443",
                                    "k8s://kube.example.org"])
def test_the_master_urls_the_job_takes(master):
    assert spark.check_master(master) == master


@pytest.mark.parametrize("master", ["yarn", "spark://m1", "mesos://m1:5050", "local[x]", "http://m1:7077", ""])
def test_other_masters_are_usage_errors_that_list_the_forms(master):
    with pytest.raises(UsageError) as raised:
        spark.check_master(master)
    assert raised.value.code == 2 and "spark://HOST:PORT" in raised.value.hint


def test_local_mode_until_a_start_asks_otherwise_and_the_choice_is_kept(ctx):
    assert spark.stream_placement(ctx) == {"master": "local[*]", "conf": {}}
    env = spark.driver_env(ctx)
    assert env["SPARK_MASTER"] == "local[*]" and "PYSPARK_SUBMIT_ARGS" not in env

    conf = spark.check_conf(["spark.driver.host=10.0.0.9", "spark.executor.extraJavaOptions=-Da=1 -Db=2",
                             "spark.pyspark.python=/opt/venv/bin/python"])
    spark.set_stream_placement(ctx, "spark://m1:7077", conf)
    env = spark.driver_env(ctx)
    assert env["SPARK_MASTER"] == "spark://m1:7077" and env["PYSPARK_PYTHON"] == "/opt/venv/bin/python"
    args = shlex.split(env["PYSPARK_SUBMIT_ARGS"])
    assert args[-1] == "pyspark-shell" and "spark.executor.extraJavaOptions=-Da=1 -Db=2" in args
    assert args[args.index("spark.driver.host=10.0.0.9") - 1] == "--conf"

    spark.set_stream_placement(ctx, "local[*]", {})
    assert "PYSPARK_SUBMIT_ARGS" not in spark.driver_env(ctx)


def test_properties_opsctl_sets_itself_are_refused(ctx):
    for item in ("spark.master=local", "spark.jars=/x.jar", "spark.submit.deployMode=cluster"):
        with pytest.raises(UsageError):
            spark.check_conf([item])
