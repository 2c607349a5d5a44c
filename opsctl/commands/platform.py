"""install, status, down: the platform's lifecycle."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from opsctl import ui
from opsctl.commands.common import (KubeconfigOption, KubeContextOption, OutputOption, TargetOption, context,
                                    set_output)
from opsctl.errors import UsageError


def install(
    target: TargetOption = None,
    only: Annotated[Optional[List[str]], typer.Option(
        "--only", metavar="STEP", help="Run only these steps (name or number; repeat or comma-separate).")] = None,
    start: Annotated[Optional[str], typer.Option(
        "--from", metavar="STEP", help="Start at this step (name or number).")] = None,
    skip: Annotated[Optional[List[str]], typer.Option(
        "--skip", metavar="STEP", help="Leave these steps out (name or number; repeat or comma-separate).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    parallel: Annotated[int, typer.Option(min=1, max=16, help="Steps run at once.")] = 4,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Install the platform: run the numbered steps in order, skipping what is already done."""
    set_output(output)
    from opsctl.app import platform

    ctx = context(target, dry_run, kube_context, kubeconfig)
    steps = platform.select_steps(ctx, only or [], start, skip or [])
    title = f"{'plan' if dry_run else 'install'} — target {ctx.target}"
    board = ui.StepBoard([(c.number, c.name) for c in steps], title, enabled=output == ui.Output.text)
    notes = ui.info if output == ui.Output.text else (lambda text: None)
    if ctx.runtime.where():
        notes(f"{'planning for' if dry_run else 'installing on'} {ctx.runtime.where()}")
    result = platform.install(ctx, steps, board, parallel, notes)
    if output == ui.Output.json:
        ui.print_json(result.data)
    else:
        results = result.data["steps"]
        for r in results:
            if r["state"] == "failed":
                ui.error(f"step {r['number']} {r['name']} failed: {r['detail']}")
        counts = {}
        for r in results:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        ui.info(", ".join(f"{n} {s}" for s, n in counts.items()))
    raise typer.Exit(result.code)


def status(
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Show every component, bundled service and the streaming job: endpoint, health,
    version, restarts and last error. Exits 3 if any is unhealthy or down."""
    set_output(output)
    from opsctl.app import platform

    ctx = context(target, kube_context=kube_context, kubeconfig=kubeconfig)
    result = platform.status(ctx)
    healths = result.data["components"]

    def render() -> None:
        ui.table(f"target {ctx.target}", ["#", "component", "endpoint", "health", "version", "restarts", "detail"],
                 [[str(h["step"]), h["component"], h["endpoint"], ui.styled(h["health"]), h["version"],
                   str(h["restarts"] or ""), h["detail"]] for h in healths])
        for h in healths:
            if h["last_error"] and h["health"] not in ("healthy", "n/a"):
                ui.error(f"{h['component']}: {h['last_error']}")

    ui.render_or_json(output, result.data, render)
    raise typer.Exit(result.code)


def down(
    purge: Annotated[bool, typer.Option(
        "--purge", help="Also delete all data, logs, secrets and state of the local platform.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --purge.")] = False,
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Stop the platform (the local processes, or uninstall the kubernetes releases); with
    --purge, delete its data too."""
    set_output(output)
    from opsctl.app import platform

    ctx = context(target, kube_context=kube_context, kubeconfig=kubeconfig)
    where = f"on {ctx.runtime.where()}" if ctx.runtime.where() else f"under {ctx.state_dir}"
    if purge and not yes and not ui.confirm(
            f"Delete every server's data, logs and secrets {where}?"):
        raise UsageError("--purge deletes all data of the local platform; nothing was deleted",
                         "confirm at the prompt, or pass --yes")
    result = platform.down(ctx, purge)
    rows = [[r["component"], ui.styled("stopped") if r["stopped"] else "not running"]
            for r in result.data["components"]]
    ui.render_or_json(output, {k: result.data[k] for k in ("stopped", "purged")},
                      lambda: ui.table(None, ["component", "result"], rows))
    if purge and output == ui.Output.text:
        ui.info(f"purged {ctx.state_dir} (downloaded artifacts kept)")


def fetch(
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Download and prepare what the local servers need (Keycloak, Kafka, Spark's Kafka source) into the cache,
    and check that every other server is installed; on kubernetes, helm and the add-ons' charts (no cluster needed)."""
    set_output(output)
    from opsctl.app import platform

    ctx = context(target, kube_context=kube_context, kubeconfig=kubeconfig, reach=False)
    result = platform.fetch(ctx)
    rows = result.data["components"]
    ui.render_or_json(output, result.data, lambda: ui.table(
        None, ["component", "state", "detail"],
        [[r["component"], ui.styled("ready" if r["ready"] else "failed"), r["detail"]] for r in rows]))
    if output == ui.Output.text:
        ui.info(f"download cache: {ctx.cache_dir}")
    raise typer.Exit(result.code)
