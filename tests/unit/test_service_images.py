"""The container images of the bundled services: one Dockerfile per image, settings only
from the environment. (No Docker engine here: the files are checked, and the wheel the
build stage makes is built for real.)"""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from opsctl import spec

SERVICES = Path(__file__).resolve().parents[2] / "services"
# What an image may set itself: where the container listens and keeps its state, and the
# paths of what it carries inside (the Kafka source jars) or gets mounted (the model).
CONTAINER_DEFAULTS = {"PYTHONUNBUFFERED", "HTTP_HOST", "HTTP_PORT", "METRICS_HOST", "METRICS_PORT",
                      "STATE_DIR", "MODEL_DIR", "SPARK_JARS"}


def dockerfile(image: str) -> str:
    return (SERVICES / "images" / image / "Dockerfile").read_text()


def instructions(text: str, keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in text.replace("\\\n", " ").splitlines()
            if line.startswith(keyword + " ")]


def image_settings(text: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for line in instructions(text, "ENV") for pair in line.split())


BUNDLED = spec.load(None).services


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_each_service_has_an_image_that_runs_its_module(name):
    text = dockerfile(BUNDLED[name].image)
    assert instructions(text, "ENTRYPOINT") == [f'["python", "-m", "{BUNDLED[name].module}"]']


@pytest.mark.parametrize("image", sorted({s.image for s in BUNDLED.values()}))
def test_images_take_their_settings_from_the_environment_and_run_unprivileged(image):
    text = dockerfile(image)
    settings = image_settings(text)
    assert set(settings) <= CONTAINER_DEFAULTS, set(settings) - CONTAINER_DEFAULTS
    port = settings.get("HTTP_PORT") or settings["METRICS_PORT"]
    assert instructions(text, "EXPOSE") == [port]
    # what it serves answers on the pod's address, not only inside the container
    assert settings.get("HTTP_HOST", settings.get("METRICS_HOST")) == "0.0.0.0"
    assert instructions(text, "USER") and instructions(text, "USER")[-1] not in {"root", "0"}
    assert not re.search(r"\b(127\.0\.0\.1|localhost)\b", " ".join(instructions(text, "ENV")))


def test_the_build_stage_wheel_holds_every_service_module(tmp_path):
    # What the build stage copies (pyproject.toml, order_services/), built in a copy so
    # that setuptools' build/ folder never lands in the repository.
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(SERVICES / "pyproject.toml", source)
    shutil.copytree(SERVICES / "order_services", source / "order_services",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel, = tmp_path.glob("order_services-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in {s.module for s in BUNDLED.values()}:
        assert module.replace(".", "/") + ".py" in names, module


def test_the_screening_image_carries_the_kafka_source_of_the_spark_version_in_the_spec():
    text = dockerfile(BUNDLED[spec.load(None).stream_job].image)
    version = spec.load(None).components["spark"].version
    assert f"spark-sql-kafka-0-10_2.13-{version}.jar" in image_settings(text)["SPARK_JARS"]


def test_the_kubernetes_image_runs_every_service_and_the_spark_job_as_spark_starts_it():
    from opsctl.app.jobs_kubernetes import JOB_FILE, MODEL_MOUNT, STATE_MOUNT

    text = dockerfile("order-services")
    settings = image_settings(text)
    version = spec.load(None).components["spark"].version
    assert f"spark-sql-kafka-0-10_2.13-{version}.jar" in settings["SPARK_JARS"]
    assert (settings["MODEL_DIR"], settings["STATE_DIR"]) == (MODEL_MOUNT, STATE_MOUNT)
    copied = instructions(text, "COPY")
    assert any(JOB_FILE.removeprefix("local://").rpartition("/")[0] in c and "stream_job.py" in c for c in copied)
    assert instructions(text, "USER")[-1] not in {"root", "0"}
    entrypoint = (SERVICES / "images" / "order-services" / "spark-entrypoint").read_text()
    assert "driver)" in entrypoint and "KubernetesExecutorBackend" in entrypoint and 'exec "$@"' in entrypoint
    job = (SERVICES / "images" / "order-services" / "stream_job.py").read_text()
    assert f"from {BUNDLED[spec.load(None).stream_job].module} import main" in job
