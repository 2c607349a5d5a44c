"""The streaming job on the kubernetes target, submitted as Spark runs on Kubernetes:
spark-submit in cluster mode against the cluster's API server. Its driver is a pod in the
jobs namespace, on the services' image of the live colour (the workers' image), with the
ServiceAccount and checkpoint volume of step spark (the spark-job chart); it asks for its
executors itself. The model goes alongside: the Secret <job>-model, mounted into the driver
at the image's MODEL_DIR (the job ships it on to its executors). `stop` deletes the driver;
its executors go with it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

from opsctl.app import Result
from opsctl.components import live, spark
from opsctl.components.service_releases import deployed_images, image
from opsctl.components.services import environment
from opsctl.context import Context
from opsctl.errors import UNHEALTHY, OpsError, UsageError

JOB_FILE = "local:///opt/order-services/stream_job.py"  # in the image (services/images/order-services)
MODEL_MOUNT = "/models/vae"  # the image's MODEL_DIR
STATE_MOUNT = "/var/lib/order-service"  # the image's STATE_DIR: the checkpoint volume
RELEASE = "spark"  # step spark's release: <release>-driver, -checkpoint, -credentials
MAX_MODEL_BYTES = 900 * 1024  # a Secret holds at most 1 MiB
SUBMIT_TIMEOUT = 300


def _names(ctx: Context) -> tuple[str, str, str]:
    """(the job, its namespace, its driver pod)."""
    return ctx.spec.stream_job, ctx.spec.kubernetes.namespace("spark"), spark.driver_pod(ctx)


def master(ctx: Context) -> str:
    return "k8s://" + ctx.runtime.api.configuration.host


def _job_image(ctx: Context) -> str:
    return (deployed_images(ctx).get(live.colour(ctx)) or {}).get("image") or image(ctx)


def submit_command(ctx: Context, master_url: str | None, properties: dict[str, str]) -> Result:
    """spark-submit in cluster mode, and the environment it runs in (the kubeconfig it reads)."""
    job, namespace, driver = _names(ctx)
    found = importlib.util.find_spec("pyspark")
    if found is None:
        raise OpsError("pyspark is not installed", "run scripts/setup (installs the services with their screening extra)")
    env = environment(ctx, job, "")
    for local_only in ("OIDC_CLIENT_SECRET", "SPARK_MASTER", "SPARK_JARS", "SPARK_LOCAL_IP", "PYSPARK_SUBMIT_ARGS",
                       "STATE_DIR", "MODEL_DIR"):
        env.pop(local_only, None)  # its Secret; spark-submit's; the image's own paths
    env["METRICS_HOST"] = "0.0.0.0"
    labels = {"app.kubernetes.io/name": job, "app.kubernetes.io/part-of": ctx.spec.platform.name}
    conf = {
        "spark.kubernetes.namespace": namespace,
        "spark.kubernetes.context": ctx.runtime.kube_context,
        "spark.kubernetes.container.image": _job_image(ctx),
        "spark.kubernetes.authenticate.driver.serviceAccountName": f"{RELEASE}-driver",
        "spark.kubernetes.driver.pod.name": driver,
        f"spark.kubernetes.driver.secrets.{job}-model": MODEL_MOUNT,
        "spark.kubernetes.driver.secretKeyRef.OIDC_CLIENT_SECRET": f"{RELEASE}-credentials:client-secret",
        "spark.kubernetes.driver.volumes.persistentVolumeClaim.checkpoint.mount.path": STATE_MOUNT,
        "spark.kubernetes.driver.volumes.persistentVolumeClaim.checkpoint.options.claimName": f"{RELEASE}-checkpoint",
        "spark.kubernetes.submission.waitAppCompletion": "false",  # submit, then watch the driver's pod
        **{f"spark.kubernetes.{role}.label.{k}": v for role in ("driver", "executor") for k, v in labels.items()},
        **{f"spark.kubernetes.driverEnv.{k}": v for k, v in env.items()},
    }
    taken = sorted(set(properties) & set(conf))
    if taken:  # stop and status find the driver by these, and the stores admit it by them
        raise UsageError(f"--conf {', '.join(taken)}: set by opsctl on the kubernetes target",
                         "leave it out; change its source in platform.yaml instead")
    conf.update(properties)
    argv = [str(Path(list(found.submodule_search_locations)[0], "bin", "spark-submit")),
            "--master", master_url or master(ctx), "--deploy-mode", "cluster", "--name", job,
            *[a for k, v in sorted(conf.items()) for a in ("--conf", f"{k}={v}")], JOB_FILE]
    return Result({"about": "spark-submit's environment (the kubeconfig it reads). The driver's secret:",
                   "argv": argv, "env": {"KUBECONFIG": str(ctx.runtime.kubeconfig)},
                   "secret_env": {"OIDC_CLIENT_SECRET": f"Secret {RELEASE}-credentials in {namespace}, "
                                                        "key client-secret (the driver reads it there)"}})


def _model_files(ctx: Context) -> dict[str, bytes]:
    folder = spark.model_dir(ctx)
    if not spark.has_model(ctx):
        raise UsageError(f"no model in {folder}", "train one first: opsctl jobs train-vae")
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    if sum(len(data) for data in files.values()) > MAX_MODEL_BYTES:
        raise OpsError(f"the model in {folder} is larger than a Secret may hold (1 MiB)",
                       "train a smaller model, or bake it into the image (MODEL_DIR)")
    return files


def start_stream(ctx: Context, master_url: str | None, properties: dict[str, str]) -> Result:
    """The model into its Secret, the last driver (and its executors) deleted, the job submitted."""
    job, namespace, driver = _names(ctx)
    if not ctx.runtime.running(spark.SparkJobRelease(ctx)):
        raise UsageError(f"step spark is not installed on {ctx.runtime.where()}",
                         "run `opsctl install --target kubernetes` first")
    ctx.runtime.keep_files(namespace, f"{job}-model", _model_files(ctx), ctx.spec.platform.name)
    submit = submit_command(ctx, master_url, properties).data
    replaced = ctx.runtime.delete_pod(namespace, driver)
    try:
        done = subprocess.run(submit["argv"], env={**_submit_env(), **submit["env"]}, capture_output=True,
                              text=True, timeout=SUBMIT_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise OpsError(f"spark-submit did not finish in {SUBMIT_TIMEOUT} s", "check the cluster's API server") from None
    if done.returncode != 0:
        said = [line for line in done.stderr.strip().splitlines()  # the exceptions, not their stack frames
                if line.strip() and not line.lstrip().startswith(("at ", "..."))]
        tail = "\n".join(said[-4:])
        raise OpsError(f"spark-submit failed (exit {done.returncode}):\n{tail}",
                       f"see `kubectl -n {namespace} describe pod {driver}`")
    return Result({"job": job, "master": submit["argv"][2], "state": "changed",
                   "detail": f"{'replaced' if replaced else 'submitted'} driver pod {driver} in {namespace}"})


def _submit_env() -> dict[str, str]:
    """This environment, less what would point spark-submit at another Spark than pyspark's."""
    return {k: v for k, v in os.environ.items() if k not in ("SPARK_HOME", "PYSPARK_SUBMIT_ARGS")}


def stop_stream(ctx: Context) -> Result:
    job, namespace, driver = _names(ctx)
    return Result({"job": job, "stopped": ctx.runtime.delete_pod(namespace, driver)})


def stream_status(ctx: Context) -> Result:
    """Its driver pod's phase: Running is healthy; no driver, or one that ended, is not."""
    job, namespace, driver = _names(ctx)
    pod = ctx.runtime.pod(namespace, driver)
    phase = pod.status.phase if pod else None
    detail = f"driver pod {driver} in {namespace}: {phase}" if pod else f"no driver pod {driver} in {namespace}"
    healthy = phase == "Running"
    return Result({"job": job, "health": "healthy" if healthy else "unhealthy", "master": master(ctx),
                   "endpoint": "", "detail": detail}, 0 if healthy else UNHEALTHY)

