"""opsctl jobs: the AI screening's jobs (train, score, evaluate) and its streaming job,
over opsctl.app.jobs: parse, call, render."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands.common import (KubeconfigOption, KubeContextOption, OutputOption, TargetOption, context,
                                   set_output)

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
    from opsctl.app import jobs

    ctx = context()
    with ui.progress("training", "epochs", output) as progress:
        result = jobs.train(ctx, source, epochs, seed, progress).data
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
    from opsctl.app import jobs

    with ui.progress("scoring", "epochs", output) as progress:
        result = jobs.score(context(), file, out, progress).data
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
    from opsctl.app import jobs

    with ui.progress("evaluating", "epochs", output) as progress:
        result = jobs.evaluate(context(), file, epochs, seed, progress).data

    def render() -> None:
        ui.table(f"trained on {result['trained_on']} normal orders, tested on {result['tested_on']}",
                 ["anomaly kind", "anomalies", "VAE ROC-AUC", "VAE PR-AUC", "IsolationForest ROC-AUC",
                  "IsolationForest PR-AUC"],
                 [[e["kind"], e["anomalies"], e["vae"]["roc_auc"], e["vae"]["pr_auc"],
                   e["isolation_forest"]["roc_auc"], e["isolation_forest"]["pr_auc"]] for e in result["table"]])
        at = result["vae_at_threshold"]
        ui.info(f"VAE at its threshold: false-positive rate {at['false_positive_rate']}, recall {at['recall']}")

    ui.render_or_json(output, result, render)


@stream_app.command("start")
def stream_start(master: MasterOption = None, conf: ConfOption = None, target: TargetOption = None,
                 kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
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

    With --target kubernetes the job is submitted to that cluster in cluster mode (its driver a \
pod in the jobs namespace, on the services' image), the model alongside as a Secret mounted \
into the driver; a start replaces the driver that runs.
    """
    set_output(output)
    from opsctl.app import jobs

    ctx = context(target, kube_context=kube_context, kubeconfig=kubeconfig)
    where = jobs.placement(master, conf, ctx.target)  # a bad --master is refused before anything else
    result = jobs.start_stream(ctx, where)
    r = result.data
    ui.render_or_json(output, r, lambda: ui.table(None, ["job", "master", "state", "detail"], [
        [r["job"], r["master"], ui.styled(r["state"]), r["detail"]]]))
    raise typer.Exit(result.code)


@stream_app.command("submit-command")
def stream_submit_command(
    master: Annotated[Optional[str], typer.Option(
        "--master", metavar="URL", help="The cluster: spark://HOST:PORT or k8s://https://HOST:PORT "
                                        "(on the kubernetes target: its cluster, unless given).")] = None,
    conf: ConfOption = None,
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Print the spark-submit command that runs the streaming job on a cluster without opsctl,
    and the environment it needs.

    On the local target: client mode, the driver runs where you run it; set OIDC_CLIENT_SECRET \
to the order-screening client's secret (Vault), and stop `opsctl jobs stream` first: both use \
the same checkpoint and metrics port. With --target kubernetes: cluster mode, as `jobs stream \
start --target kubernetes` submits it (the driver reads its secret from a Secret). Secrets are \
named, never printed.
    """
    set_output(output)
    import shlex

    from opsctl.app import jobs

    ctx = context(target, kube_context=kube_context, kubeconfig=kubeconfig)
    if master is None and ctx.target != "kubernetes":
        from opsctl.errors import UsageError

        raise UsageError("Missing option '--master'", "give the cluster's master URL: --master spark://HOST:PORT "
                                                      "or k8s://https://HOST:PORT")
    where = jobs.placement(master, conf, ctx.target)
    data = jobs.submit_command(ctx, where).data
    argv, env, secrets = data["argv"], data["env"], data["secret_env"]

    def render() -> None:
        lines = [f"# {data['about']}"]
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
    from opsctl.app import jobs

    properties = jobs.cluster_conf(context()).data["properties"]
    ui.render_or_json(output, {"properties": properties},
                      lambda: ui.out("\n".join(f"{k} {v}" for k, v in properties.items())))


@stream_app.command("stop")
def stream_stop(target: TargetOption = None, kube_context: KubeContextOption = None,
                kubeconfig: KubeconfigOption = None, output: OutputOption = ui.Output.text) -> None:
    """Stop the streaming job after the batch in hand (its checkpoint keeps its place)."""
    set_output(output)
    from opsctl.app import jobs

    r = jobs.stop_stream(context(target, kube_context=kube_context, kubeconfig=kubeconfig)).data
    ui.render_or_json(output, r, lambda: ui.table(
        None, ["job", "result"], [[r["job"], ui.styled("stopped") if r["stopped"] else "not running"]]))


@stream_app.command("status")
def stream_status(target: TargetOption = None, kube_context: KubeContextOption = None,
                  kubeconfig: KubeconfigOption = None, output: OutputOption = ui.Output.text) -> None:
    """Whether the streaming job runs, and what it has scored, flagged and dead-lettered (on
    kubernetes: its driver pod's phase)."""
    set_output(output)
    from opsctl.app import jobs

    result = jobs.stream_status(context(target, kube_context=kube_context, kubeconfig=kubeconfig))
    r = result.data
    ui.render_or_json(output, r, lambda: ui.table(
        None, ["job", "health", "master", "scored", "flagged", "dead-lettered", "detail"],
        [[r["job"], ui.styled(r["health"]), r["master"], r.get("scored", "-"), r.get("flagged", "-"),
          r.get("dead_lettered", "-"), r["detail"]]]))
    raise typer.Exit(result.code)
