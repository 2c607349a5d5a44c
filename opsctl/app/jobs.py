"""The AI screening's jobs: train, score and evaluate (run in the services' package as
`python -m order_services.screening`, which reports progress as JSON lines) and the
streaming job, run through the target like the other services."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from opsctl.app import Result
from opsctl.components import build, keycloak_realm, spark
from opsctl.components.services import BundledService
from opsctl.context import Context
from opsctl.errors import FAILED, UNHEALTHY, OpsError, UsageError

Progress = Callable[[int, int, str], None]  # done, total, note


def existing(path: Path) -> Path:
    if not path.is_file():
        raise UsageError(f"{path}: no such file", "give a JSON-lines file of orders (opsctl orders generate writes one)")
    return path


def require_model(ctx: Context) -> Path:
    if not spark.has_model(ctx):
        raise UsageError(f"no model in {spark.model_dir(ctx)}", "train one first: opsctl jobs train-vae")
    return spark.model_dir(ctx)


def run_job(job: str, *args: str, progress: Progress) -> dict:
    """Run one screening job, its epoch events to `progress`; its result (or OpsError)."""
    argv = [sys.executable, "-m", "order_services.screening", job, *args]
    result, error = None, None
    # stderr to a file, not a pipe: a chatty job could fill the pipe while we read stdout.
    with tempfile.TemporaryFile("w+") as stderr_file, \
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr_file, text=True) as process:
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "progress":
                progress(event["epoch"], event["epochs"], f"loss {event['loss']:.4f}")
            elif event.get("event") == "result":
                result = event
            elif event.get("event") == "error":
                error = event["message"]
        process.wait()
        stderr_file.seek(0)
        stderr = stderr_file.read()
    if error:
        raise (UsageError if process.returncode == 2 else OpsError)(error)
    if result is None:
        tail = "\n".join(stderr.strip().splitlines()[-8:])
        raise OpsError(f"the {job} job failed (exit {process.returncode}):\n{tail}",
                       "is the services' screening extra installed? run scripts/setup")
    result.pop("event")
    return result


def train(ctx: Context, source: str, epochs: int | None, seed: int | None, progress: Progress) -> Result:
    """Train the VAE (on the stored orders, or a file) as the platform's model; a running
    stream restarts on it."""
    from opsctl.app.orders import export_orders

    settings = ctx.spec.screening
    model = spark.model_dir(ctx)
    data = model.parent / ".training-orders.jsonl"
    try:
        if source == "mongo":
            export_orders(ctx, data)
        else:
            data = existing(Path(source))
        result = run_job("train", "--data", str(data), "--model", str(model),
                         "--epochs", str(epochs or settings.epochs), "--seed", str(settings.seed if seed is None else seed),
                         "--target-fpr", str(settings.target_fpr), progress=progress)
    finally:
        if source == "mongo":
            data.unlink(missing_ok=True)
    result["stream_restarted"] = restart_stream_if_running(ctx)
    return Result(result)


def score(ctx: Context, file: Path, out: Path | None, progress: Progress) -> Result:
    model = require_model(ctx)
    out = out or file.with_name(file.name + ".scores.jsonl")
    return Result(run_job("score", "--data", str(existing(file)), "--model", str(model), "--out", str(out),
                          progress=progress))


def evaluate(ctx: Context, file: Path, epochs: int | None, seed: int | None, progress: Progress) -> Result:
    settings = ctx.spec.screening
    return Result(run_job("evaluate", "--data", str(existing(file)), "--epochs", str(epochs or settings.epochs),
                          "--seed", str(settings.seed if seed is None else seed), progress=progress))


# --- the streaming job ----------------------------------------------------------------------
def placement(master: str | None, conf: list[str] | None, target: str = "local") -> tuple[str | None, dict[str, str]]:
    """--master and --conf, checked (a UsageError, exit 2, names the accepted forms). On
    kubernetes the master is the target's cluster unless given, and only a k8s:// one."""
    if target == "kubernetes":
        checked = spark.check_master(master) if master else None
        if checked and not checked.startswith("k8s://"):
            raise UsageError(f"--master {master}: the kubernetes target runs the job on a Kubernetes cluster",
                             "give k8s://https://HOST:PORT, or leave --master out for the target's cluster")
        return checked, spark.check_conf(conf or [])
    return spark.check_master(master or spark.LOCAL_MASTER), spark.check_conf(conf or [])


def _stream(ctx: Context, with_secret: bool = False) -> BundledService:
    job = ctx.spec.stream_job
    return BundledService(job, ctx, keycloak_realm.client_secret(ctx, job) if with_secret else None)


def start_stream(ctx: Context, where: tuple[str, dict[str, str]] | None = None) -> Result:
    """Start (or restart on changed settings) the stream; `where` (master, Spark properties)
    is kept for later restarts, None keeps the one kept. On kubernetes: submitted to the cluster."""
    if ctx.target == "kubernetes":
        from opsctl.app import jobs_kubernetes

        return jobs_kubernetes.start_stream(ctx, *(where or (None, {})))
    require_model(ctx)
    build("spark", ctx).check_installed()
    if where is not None:
        spark.check_reachable(where[0])
        spark.set_stream_placement(ctx, *where)
    outcome = _stream(ctx, with_secret=True).reconcile()
    return Result({"job": ctx.spec.stream_job, "master": spark.stream_placement(ctx)["master"],
                   "state": outcome.state, "detail": outcome.detail},
                  FAILED if outcome.state == "failed" else 0)


def restart_stream_if_running(ctx: Context) -> bool:
    """Restart a running stream (on a new model): on the master it was started on."""
    stream = _stream(ctx)
    if not ctx.runtime.running(stream):
        return False
    stream.stop()
    start_stream(ctx)
    return True


def stop_stream(ctx: Context) -> Result:
    if ctx.target == "kubernetes":
        from opsctl.app import jobs_kubernetes

        return jobs_kubernetes.stop_stream(ctx)
    return Result({"job": ctx.spec.stream_job, "stopped": _stream(ctx).stop()})


def stream_status(ctx: Context) -> Result:
    from opsctl import httpclient

    if ctx.target == "kubernetes":
        from opsctl.app import jobs_kubernetes

        return jobs_kubernetes.stream_status(ctx)
    health = _stream(ctx).health()
    counts = {}
    if health.health == "healthy":
        metrics = {"screening_orders_scored_total": "scored", "screening_orders_flagged_total": "flagged",
                   "screening_records_dead_lettered_total": "dead_lettered"}
        for line in httpclient.get(f"{health.endpoint}/metrics").splitlines():
            name, _, value = line.partition(" ")
            if name in metrics:
                counts[metrics[name]] = int(float(value))
    return Result({"job": ctx.spec.stream_job, "health": health.health,
                   "master": spark.stream_placement(ctx)["master"], "endpoint": health.endpoint,
                   "detail": health.detail, **counts}, 0 if health.health == "healthy" else UNHEALTHY)


def submit_command(ctx: Context, where: tuple[str, dict[str, str]]) -> Result:
    """The spark-submit command that runs the stream on a cluster without opsctl, its
    driver's environment, and the secrets it needs (named, never given)."""
    import importlib.util

    from opsctl.components.services import environment

    master, properties = where
    if ctx.target == "kubernetes":
        from opsctl.app import jobs_kubernetes

        return jobs_kubernetes.submit_command(ctx, master, properties)
    build("spark", ctx).check_installed()  # the Kafka source jars, fetched if they are not
    stream = ctx.spec.stream_job
    pyspark, job = importlib.util.find_spec("pyspark"), importlib.util.find_spec(ctx.spec.services[stream].module)
    if pyspark is None or job is None:
        raise OpsError("pyspark or the services' screening job is not installed",
                       "run scripts/setup (installs the services with their screening extra)")
    env = environment(ctx, stream, "")
    for name in ("OIDC_CLIENT_SECRET", "SPARK_MASTER", "SPARK_JARS", "PYSPARK_SUBMIT_ARGS"):
        env.pop(name, None)  # the secret is named below; spark-submit's arguments give the rest
    names = ctx.spec.names
    secrets = {"OIDC_CLIENT_SECRET": f"Vault {names.vault.kv_mount}/{names.vault.clients_path}/{stream}, "
                                     "key client_secret"}
    properties = {"spark.pyspark.python": sys.executable, **properties}  # driver and executors: the services' Python
    argv = [str(Path(list(pyspark.submodule_search_locations)[0], "bin", "spark-submit")), "--master", master,
            "--deploy-mode", "client", "--name", stream, "--jars", ",".join(str(j) for j in spark.job_jars(ctx)),
            *[a for k, v in sorted(properties.items()) for a in ("--conf", f"{k}={v}")], job.origin]
    return Result({"about": "The driver's environment. Also set, from Vault (opsctl never prints secrets):",
                   "argv": argv, "env": env, "secret_env": secrets})


def cluster_conf(ctx: Context) -> Result:
    """The Spark properties a standalone cluster needs to accept the job (a secret)."""
    from opsctl.components import vault

    stream = ctx.spec.stream_job
    secret = (vault.kv_read(ctx, vault.admin(ctx), stream) or {}).get("spark_auth_secret")
    if not secret:
        raise OpsError(f"Vault holds no spark_auth_secret for {stream}",
                       "run opsctl install (it generates the job's secrets), then this again")
    return Result({"properties": {"spark.authenticate": "true", "spark.authenticate.secret": secret}})
