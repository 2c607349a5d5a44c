"""What every command shares: the output option, loading the spec, the error boundary."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from opsctl import ui
from opsctl.commands.completion import COMPLETE_VAR
from opsctl.errors import OpsError

CONFIG_FILE: str | None = None  # set by the root callback (--config)

OutputOption = Annotated[
    ui.Output, typer.Option("--output", "-o", help="text for people, json for scripts.")
]


TargetOption = Annotated[str | None, typer.Option(
    "--target", "-t", help="local or kubernetes [default: platform.target]")]
KubeContextOption = Annotated[str | None, typer.Option(
    "--context", help="kubernetes target: the kubeconfig context [default: its current one]")]
KubeconfigOption = Annotated[str | None, typer.Option(
    "--kubeconfig", help="kubernetes target: the kubeconfig file [default: $KUBECONFIG, else ~/.kube/config]")]

_OUTPUT = ui.Output.text  # how errors are printed: set by each command from --output


def set_output(output: ui.Output) -> None:
    global _OUTPUT
    _OUTPUT = output


def load_spec():
    from opsctl import spec

    return spec.load(CONFIG_FILE)


def override_file() -> Path | None:
    from opsctl import spec

    return spec.override_path(CONFIG_FILE)


def context(target: str | None = None, dry_run: bool = False, kube_context: str | None = None,
            kubeconfig: str | None = None, reach: bool = True):
    """The run context: the spec, the target and the state folder of this working directory;
    `reach`: checked that the target can be used (its cluster answers)."""
    from opsctl.context import Context
    from opsctl.errors import UsageError

    if target not in (None, "local", "kubernetes"):
        raise UsageError(f"unknown target '{target}'", "use --target local or --target kubernetes")
    spec = load_spec()
    chosen = target or spec.platform.target
    if chosen != "kubernetes" and (kube_context or kubeconfig):
        raise UsageError("--context and --kubeconfig are for the kubernetes target",
                         "add --target kubernetes, or leave them out")
    ctx = Context(spec, chosen, (Path.cwd() / spec.platform.state_dir).resolve(), dry_run,
                  {"context": kube_context, "kubeconfig": kubeconfig, "kind_name": spec.platform.name})
    if reach:
        ctx.runtime.check_available()
    return ctx


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_cli(app: typer.Typer) -> int:
    """Run the app; a user-facing error becomes a message and an exit code, never a traceback.

    Typer itself reports usage errors (exit 2) and turns Ctrl-C into exit 130.
    """
    # Closing the terminal or `kill` stops a run as Ctrl-C does: the state file is kept right.
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    signal.signal(signal.SIGHUP, _terminate_as_interrupt)
    try:
        app(prog_name="opsctl", complete_var=COMPLETE_VAR)
    except OpsError as e:
        ui.error(e.message, e.hint, e.code, _OUTPUT)
        return e.code
    return 0
