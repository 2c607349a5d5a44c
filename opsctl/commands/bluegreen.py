"""opsctl bluegreen: the live colour, and the gated switch of the edge between blue and green."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands.common import (KubeconfigOption, KubeContextOption, OutputOption, TargetOption, context,
                                   set_output)
from opsctl.errors import UsageError

app = typer.Typer(help="Blue/green: which colour is live; switch the edge behind a gate, and back.",
                  no_args_is_help=True)

ToOption = Annotated[Optional[str], typer.Option(
    "--to", metavar="COLOUR", help="The colour to switch to (blue or green) [default: the idle one].")]
AnalysisOption = Annotated[Optional[float], typer.Option(
    "--analysis-seconds", min=1, max=3600, metavar="N",
    help="Seconds of analysis before and after the switch [default: platform.yaml bluegreen.analysis_seconds].")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before moving live traffic.")]


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "never switched"


@app.command()
def status(target: TargetOption = None, kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
           output: OutputOption = ui.Output.text) -> None:
    """The live colour, where the edge sends clients, each colour's build and services, the
    last switches. Exits 3 if the edge is not on the live colour or the live colour is unhealthy."""
    set_output(output)
    from opsctl.app import bluegreen

    result = bluegreen.status(context(target, True, kube_context, kubeconfig))
    data = result.data

    def text() -> None:
        ui.info(f"live: {data['live']} (since {_when(data['since'])}); the edge sends clients to: {data['edge']}")
        ui.table(None, ["colour", "datacenter", "live", "version", "service", "health", "detail"],
                 [[c["colour"], c["datacenter"], "yes" if c["live"] else "", c["version"], s["service"],
                   ui.styled(s["health"]), s["detail"]] for c in data["colours"] for s in c["services"]])
        if data["history"]:
            ui.table("Last switches", ["when", "from", "to", "reason"],
                     [[_when(h.get("since")), h.get("previous", ""), h["colour"], h.get("reason", "")]
                      for h in data["history"]])

    ui.render_or_json(output, data, text)
    raise typer.Exit(result.code)


def _confirm(yes: bool, question: str) -> None:
    if not yes and not ui.confirm(question):
        raise UsageError("not switched: this moves live traffic", "confirm at the prompt, or pass --yes")


def _render_switch(output: ui.Output, result) -> None:
    data = result.data

    def text() -> None:
        ui.table(f"{data['from']} → {data['to']}", ["check", "result", "detail"],
                 [[c["check"], ui.styled("ok" if c["ok"] else "failed"), c["detail"]] for c in data["checks"]])
        if data["rolled_back"]:
            ui.error(f"switched to {data['to']}, then back to {data['from']}: the {data['failed']} failed",
                     "see the checks above; the logs: opsctl services logs <service> --colour " + data["to"])
        elif data["switched"]:
            ui.info(f"{data['to']} is live (the edge moved in {data['switch_seconds']:.2f} s); "
                    f"{data['from']} keeps running: opsctl bluegreen rollback takes it back")
        else:
            ui.error(f"not switched: the {data['failed']} failed; {data['from']} is still live",
                     "fix it and run the switch again")

    ui.render_or_json(output, data, text)
    raise typer.Exit(result.code)


@app.command()
def switch(to: ToOption = None, analysis_seconds: AnalysisOption = None, yes: YesOption = False,
           target: TargetOption = None, kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
           output: OutputOption = ui.Output.text) -> None:
    """Move the edge to the other colour: only after its gate passes (health in Consul, a smoke
    order through its ingress, analysis under synthetic traffic; on kubernetes: its Deployments
    available), watching it after and switching back by itself when it degrades. Exits 1 if it
    did not switch or went back."""
    set_output(output)
    from opsctl.app import bluegreen

    ctx = context(target, kube_context=kube_context, kubeconfig=kubeconfig)
    current, target = bluegreen.colours(ctx, to)
    _confirm(yes, f"Switch live traffic from {current} to {target}?")
    _render_switch(output, bluegreen.switch(ctx, target, analysis_seconds))


@app.command()
def deploy(
    colour: Annotated[Optional[str], typer.Option(
        "--colour", "--color", metavar="COLOUR", help="The colour to deploy to [default: the idle one; never the live one].")] = None,
    ref: Annotated[Optional[str], typer.Option(
        "--ref", metavar="GIT_REF", help="A commit, branch or tag to build [default: the working tree as it is].")] = None,
    source: Annotated[Optional[str], typer.Option(
        "--source", metavar="DIR", help="The checkout to build from [default: the one opsctl's services come from].")] = None,
    image: Annotated[Optional[str], typer.Option(
        "--image", metavar="REPOSITORY:TAG", help="kubernetes target: the services' image the colour runs.")] = None,
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Build the services into the idle colour's own environment (the heavy dependencies are
    reused from the main one) and restart that colour on it. The live colour is never touched;
    `bluegreen switch` then moves traffic, behind its gate. On kubernetes: --image, rolled out
    on that colour's Deployments (the old image back if they do not become ready)."""
    set_output(output)
    from opsctl.app import bluegreen

    result = bluegreen.deploy(context(target, kube_context=kube_context, kubeconfig=kubeconfig),
                              colour, ref, source, image)
    data, built = result.data, result.data["build"]
    runs = built.get("image") or f"{built['commit']} ({built['ref']})"
    ui.render_or_json(output, data, lambda: (
        ui.info(f"{data['colour']} runs {runs}"),
        ui.table(None, ["service", "state", "detail"],
                 [[r["service"], ui.styled(r["state"]), r["detail"]] for r in data["services"]])))
    raise typer.Exit(result.code)


@app.command()
def rollback(analysis_seconds: AnalysisOption = None, yes: YesOption = False,
             target: TargetOption = None, kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
             output: OutputOption = ui.Output.text) -> None:
    """Back to the colour that was live before the last switch, through the same gate."""
    set_output(output)
    from opsctl.app import bluegreen

    ctx = context(target, kube_context=kube_context, kubeconfig=kubeconfig)
    _confirm(yes, f"Roll live traffic back from {bluegreen.colours(ctx)[0]}?")
    _render_switch(output, bluegreen.rollback(ctx, analysis_seconds))
