"""opsctl jobs: the AI screening's jobs (train, score, evaluate) and its streaming job.

The jobs run in the services' package (`python -m order_services.screening`, which opsctl
does not import): they report progress as JSON lines, rendered here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output
from opsctl.errors import FAILED, OpsError, UsageError

app = typer.Typer(help="AI screening: train and evaluate the VAE, score orders, run the streaming job.",
                  no_args_is_help=True)
stream_app = typer.Typer(help="The streaming job: Kafka orders-topic → VAE → orders-validation.",
                         no_args_is_help=True)
app.add_typer(stream_app, name="stream")

MasterOption = Annotated[Optional[str], typer.Option(
    "--master", metavar="URL", show_default=False,
    help="Where the executors run: local[*] (Spark local mode, the default), spark://HOST:PORT "
         "(a standalone cluster) or k8s://https://HOST:PORT (Kubernetes); the driver stays here.")]
ConfOption = Annotated[Optional[list[str]], typer.Option(
    "--conf", metavar="KEY=VALUE", show_default=False,
    help="A Spark property for the job, as spark-submit's --conf (repeatable), e.g. "
         "spark.driver.host=ADDRESS the cluster reaches this machine at, spark.executor.memory=2g.")]
EpochsOption = Annotated[Optional[int], typer.Option(min=1, max=10000, help="Training epochs [default: platform.yaml screening.epochs].")]
SeedOption = Annotated[Optional[int], typer.Option(help="Seed: the same data and seed give the same model [default: screening.seed].")]


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise UsageError(f"{path}: no such file", "give a JSON-lines file of orders (opsctl orders generate writes one)")
    return path


def _require_model(ctx) -> Path:
    from opsctl.components import spark

    if not spark.has_model(ctx):
        raise UsageError(f"no model in {spark.model_dir(ctx)}", "train one first: opsctl jobs train-vae")
    return spark.model_dir(ctx)


def run_job(job: str, *args: str, output: ui.Output, title: str) -> dict:
    """Run one screening job; a progress bar from its epoch events; its result (or OpsError)."""
    argv = [sys.executable, "-m", "order_services.screening", job, *args]
    result, error = None, None
    # stderr to a file, not a pipe: a chatty job could fill the pipe while we read stdout.
    with tempfile.TemporaryFile("w+") as stderr_file, \
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr_file, text=True) as process, \
            ui.progress(title, "epochs", output) as progress:
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


@app.command("train-vae")
def train_vae(
    source: Annotated[str, typer.Option("--from", help="mongo (the stored regular orders) or a JSON-lines FILE.")] = "mongo",
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Train the VAE on normal orders and save it as the platform's model; a running
    streaming job is restarted to use it."""
    set_output(output)
    ctx = context()
    from opsctl.components import spark

    settings = ctx.spec.screening
    model = spark.model_dir(ctx)
    data = model.parent / ".training-orders.jsonl"
    try:
        if source == "mongo":
            from opsctl.commands.orders import export_orders

            export_orders(ctx, data)
        else:
            data = _existing(Path(source))
        result = run_job("train", "--data", str(data), "--model", str(model),
                         "--epochs", str(epochs or settings.epochs), "--seed", str(settings.seed if seed is None else seed),
                         "--target-fpr", str(settings.target_fpr), output=output, title="training")
    finally:
        if source == "mongo":
            data.unlink(missing_ok=True)
    result["stream_restarted"] = _restart_stream_if_running(ctx)
    training = result["training"]
    ui.render_or_json(output, result, lambda: ui.table(None, ["model", "value"], [
        ["saved in", result["model"]], ["orders", f"{training['orders']} ({training['unusable']} unusable)"],
        ["epochs", training["epochs"]], ["final loss", training["final_loss"]],
        ["threshold", f"{result['threshold']:.5f} (target false-positive rate {training['target_fpr']})"],
        ["trained in", f"{training['seconds']} s"],
        ["streaming job", "restarted with it" if result["stream_restarted"] else "not running"]]))


@app.command()
def score(
    file: Annotated[Path, typer.Argument(help="JSON-lines file of orders.")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write one score per order [default: FILE.scores.jsonl].")] = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Score orders offline with the platform's model: flagged or not, and why not scored."""
    set_output(output)
    model = _require_model(context())
    out = out or file.with_name(file.name + ".scores.jsonl")
    result = run_job("score", "--data", str(_existing(file)), "--model", str(model), "--out", str(out),
                     output=output, title="scoring")
    ui.render_or_json(output, result, lambda: ui.table(None, ["orders", "scored", "flagged", "unusable", "scores in"], [
        [result["orders"], result["scored"], result["flagged"], result["unusable"], result["out"]]]))


@app.command()
def evaluate(
    file: Annotated[Path, typer.Argument(help="Labelled JSON-lines orders (opsctl orders generate).")],
    epochs: EpochsOption = None,
    seed: SeedOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Detection quality: the VAE against an IsolationForest on the same split, ROC-AUC and
    PR-AUC overall and per anomaly kind."""
    set_output(output)
    ctx = context()
    settings = ctx.spec.screening
    result = run_job("evaluate", "--data", str(_existing(file)), "--epochs", str(epochs or settings.epochs),
                     "--seed", str(settings.seed if seed is None else seed), output=output, title="evaluating")

    def render() -> None:
        ui.table(f"trained on {result['trained_on']} normal orders, tested on {result['tested_on']}",
                 ["anomaly kind", "anomalies", "VAE ROC-AUC", "VAE PR-AUC", "IsolationForest ROC-AUC",
                  "IsolationForest PR-AUC"],
                 [[e["kind"], e["anomalies"], e["vae"]["roc_auc"], e["vae"]["pr_auc"],
                   e["isolation_forest"]["roc_auc"], e["isolation_forest"]["pr_auc"]] for e in result["table"]])
        at = result["vae_at_threshold"]
        ui.info(f"VAE at its threshold: false-positive rate {at['false_positive_rate']}, recall {at['recall']}")

    ui.render_or_json(output, result, render)


def _restart_stream_if_running(ctx) -> bool:
    """Restart a running stream (on a new model): on the master it was started on."""
    from opsctl.components.services import BundledService

    stream = BundledService(ctx.spec.stream_job, ctx)
    if not ctx.runtime.running(stream):
        return False
    stream.stop()
    _start_stream(ctx)
    return True


def _placement(master: str | None, conf: list[str] | None) -> tuple[str, dict[str, str]]:
    """--master and --conf, checked (a UsageError, exit 2, names the accepted forms)."""
    from opsctl.components import spark

    return spark.check_master(master or spark.LOCAL_MASTER), spark.check_conf(conf or [])


def _start_stream(ctx, placement: tuple[str, dict[str, str]] | None = None):
    """Start (or restart on changed settings) the stream; `placement` (master, Spark
    properties) is kept for later restarts, None keeps the one kept."""
    from opsctl.components import build, keycloak_realm, spark
    from opsctl.components.services import BundledService

    _require_model(ctx)
    build("spark", ctx).check_installed()
    if placement is not None:
        spark.check_reachable(placement[0])
        spark.set_stream_placement(ctx, *placement)
    job = ctx.spec.stream_job
    return BundledService(job, ctx, keycloak_realm.client_secret(ctx, job)).reconcile()


@stream_app.command("start")
def stream_start(master: MasterOption = None, conf: ConfOption = None,
                 output: OutputOption = ui.Output.text) -> None:
    """Start the streaming job and wait until it runs; a running one given other settings
    restarts with them and goes on from its checkpoint.

    With --master spark://… or k8s://… the driver stays here (the order-screening service) \
and the executors run on that cluster (client mode); the job ships the model to them. The \
cluster must reach Kafka and this machine (--conf spark.driver.host=ADDRESS), its Python \
must have the services' screening extra (--conf spark.pyspark.python=PATH), and a standalone \
cluster must know the job's secret (opsctl jobs stream cluster-conf): every connection is \
authenticated.

    The master and --conf are kept: a restart opsctl makes by itself (jobs train-vae, services \
start) keeps the job where it runs; a start without --master runs it in local mode again.
    """
    set_output(output)
    placement = _placement(master, conf)
    ctx = context()
    outcome = _start_stream(ctx, placement)
    data = {"job": ctx.spec.stream_job, "master": placement[0], "state": outcome.state, "detail": outcome.detail}
    ui.render_or_json(output, data, lambda: ui.table(None, ["job", "master", "state", "detail"], [
        [ctx.spec.stream_job, placement[0], ui.styled(outcome.state), outcome.detail]]))
    if outcome.state == "failed":
        raise typer.Exit(FAILED)


@stream_app.command("submit-command")
def stream_submit_command(
    master: Annotated[str, typer.Option("--master", metavar="URL", help="The cluster: spark://HOST:PORT or k8s://https://HOST:PORT.")],
    conf: ConfOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Print the spark-submit command that runs the streaming job on a cluster without opsctl,
    and the environment its driver needs (client mode: the driver runs where you run it).

    Secrets are named, never printed: set OIDC_CLIENT_SECRET to the order-screening client's \
secret (Vault). Stop `opsctl jobs stream` first: both use the same checkpoint and metrics port.
    """
    set_output(output)
    import importlib.util
    import shlex

    from opsctl.components import build, spark
    from opsctl.components.services import environment

    master, properties = _placement(master, conf)
    ctx = context()
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
    properties.setdefault("spark.pyspark.python", sys.executable)  # driver and executors: the services' Python
    argv = [str(Path(list(pyspark.submodule_search_locations)[0], "bin", "spark-submit")), "--master", master,
            "--deploy-mode", "client", "--name", stream, "--jars", ",".join(str(j) for j in spark.job_jars(ctx)),
            *[a for k, v in sorted(properties.items()) for a in ("--conf", f"{k}={v}")], job.origin]
    data = {"argv": argv, "env": env, "secret_env": secrets}

    def render() -> None:
        lines = ["# The driver's environment. Also set, from Vault (opsctl never prints secrets):"]
        lines += [f"#   {name}: {where}" for name, where in secrets.items()]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        options = [f"{argv[i]} {shlex.quote(argv[i + 1])}" for i in range(1, len(argv) - 1, 2)]
        lines.append(" \\\n  ".join([shlex.quote(argv[0]), *options, shlex.quote(argv[-1])]))
        ui.out("\n".join(lines))

    ui.render_or_json(output, data, render)


@stream_app.command("cluster-conf")
def stream_cluster_conf(output: OutputOption = ui.Output.text) -> None:
    """Print the Spark properties a standalone cluster's master and workers need to accept
    the streaming job: spark.authenticate and the secret the job shares with them (Vault).

    This prints a secret: write it to a file only its owner can read, e.g. \
`(umask 077; opsctl jobs stream cluster-conf > auth.conf)`, and start the master and each \
worker with --properties-file auth.conf (or add the lines to their conf/spark-defaults.conf).
    """
    set_output(output)
    from opsctl.components import vault

    ctx = context()
    stream = ctx.spec.stream_job
    secret = (vault.kv_read(ctx, vault.admin(ctx), stream) or {}).get("spark_auth_secret")
    if not secret:
        raise OpsError(f"Vault holds no spark_auth_secret for {stream}",
                       "run opsctl install (it generates the job's secrets), then this again")
    properties = {"spark.authenticate": "true", "spark.authenticate.secret": secret}
    ui.render_or_json(output, {"properties": properties},
                      lambda: ui.out("\n".join(f"{k} {v}" for k, v in properties.items())))


@stream_app.command("stop")
def stream_stop(output: OutputOption = ui.Output.text) -> None:
    """Stop the streaming job after the batch in hand (its checkpoint keeps its place)."""
    set_output(output)
    from opsctl.components.services import BundledService

    ctx = context()
    stream = ctx.spec.stream_job
    stopped = BundledService(stream, ctx).stop()
    ui.render_or_json(output, {"job": stream, "stopped": stopped}, lambda: ui.table(
        None, ["job", "result"], [[stream, ui.styled("stopped") if stopped else "not running"]]))


@stream_app.command("status")
def stream_status(output: OutputOption = ui.Output.text) -> None:
    """Whether the streaming job runs, and what it has scored, flagged and dead-lettered."""
    set_output(output)
    from opsctl import httpclient
    from opsctl.components import spark
    from opsctl.components.services import BundledService
    from opsctl.errors import UNHEALTHY

    ctx = context()
    stream = ctx.spec.stream_job
    health = BundledService(stream, ctx).health()
    master = spark.stream_placement(ctx)["master"]
    counts = {}
    if health.health == "healthy":
        metrics = {"screening_orders_scored_total": "scored", "screening_orders_flagged_total": "flagged",
                   "screening_records_dead_lettered_total": "dead_lettered"}
        for line in httpclient.get(f"{health.endpoint}/metrics").splitlines():
            name, _, value = line.partition(" ")
            if name in metrics:
                counts[metrics[name]] = int(float(value))
    data = {"job": stream, "health": health.health, "master": master, "endpoint": health.endpoint,
            "detail": health.detail, **counts}
    ui.render_or_json(output, data, lambda: ui.table(None, ["job", "health", "master", "scored", "flagged", "dead-lettered", "detail"], [
        [stream, ui.styled(health.health), master, counts.get("scored", "-"), counts.get("flagged", "-"),
         counts.get("dead_lettered", "-"), health.detail]]))
    if health.health != "healthy":
        raise typer.Exit(UNHEALTHY)
