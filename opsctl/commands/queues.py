"""opsctl queues: the RabbitMQ topology of the order flow."""

from __future__ import annotations

from typing import Annotated

import typer

from opsctl import ui
from opsctl.commands import reconcile
from opsctl.commands.common import (KubeconfigOption, KubeContextOption, OutputOption, TargetOption, context,
                                   set_output)

app = typer.Typer(help="RabbitMQ: exchanges, queues and bindings of the order flow.",
                  no_args_is_help=True)


@app.command()
def apply(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes; make none.")] = False,
    recreate: Annotated[bool, typer.Option(
        "--recreate", help="Replace a queue or exchange whose settings differ (if empty).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="With --recreate: also replace queues that hold messages (drops them).")] = False,
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Declare the exchanges, queues and bindings of the spec; says what it changed."""
    set_output(output)
    from opsctl.app import config

    step = config.topology(context(target, dry_run, kube_context, kubeconfig), recreate, force)
    reconcile.render(config.apply([step], dry_run), output, "queues")


@app.command()
def diff(target: TargetOption = None, kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
         output: OutputOption = ui.Output.text) -> None:
    """Drift between the spec and RabbitMQ, per object. Exits 0 in sync, 1 on drift, 2 on an error."""
    set_output(output)
    from opsctl.app import config

    steps = lambda: [config.topology(context(target, True, kube_context, kubeconfig))]  # noqa: E731
    reconcile.render(config.diff(steps), output, "queues")


@app.command()
def status(target: TargetOption = None, kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
           output: OutputOption = ui.Output.text) -> None:
    """Depth, consumers and publish/deliver rates of the order queues. Exits 3 if one is missing."""
    set_output(output)
    from opsctl.app import config

    result = config.queue_status(context(target, True, kube_context, kubeconfig))
    rows = result.data["queues"]
    ui.render_or_json(output, result.data, lambda: ui.table(
        None, ["queue", "messages", "ready", "unacked", "consumers", "publish/s", "deliver/s"],
        [[r["queue"], *(["missing"] + [""] * 5 if not r["exists"] else [
            r["messages"], r["ready"], r["unacked"], r["consumers"],
            f"{r['publish_rate']:.1f}", f"{r['deliver_rate']:.1f}"])] for r in rows]))
    raise typer.Exit(result.code)
