"""opsctl services: the bundled order services as local processes."""

from __future__ import annotations

import time
from typing import Annotated, List, Optional

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output

app = typer.Typer(help="The bundled order services: start, stop, status, logs.",
                  no_args_is_help=True)


def _complete_service(incomplete: str) -> list[str]:
    """Service names from the spec, for the shell's completion."""
    from opsctl.commands.common import load_spec

    try:
        return [name for name in load_spec().services if name.startswith(incomplete)]
    except Exception:  # a broken opsctl.yaml: no suggestions rather than a traceback in the shell
        return []


NamesArg = Annotated[Optional[List[str]], typer.Argument(
    metavar="[SERVICE]...", autocompletion=_complete_service,
    help="Services to act on [default: those started with the platform; stop: all].")]
ColourOption = Annotated[Optional[str], typer.Option(
    "--colour", "--color", metavar="COLOUR",
    help="Only this colour's copy of the HTTP services (blue or green) [default: both; logs: the live one].")]


@app.command()
def start(names: NamesArg = None, colour: ColourOption = None,
          output: OutputOption = ui.Output.text) -> None:
    """Start services (or restart those whose settings changed); waits until each is ready."""
    set_output(output)
    from opsctl.app import services

    result = services.start(context(), names, colour)
    rows = result.data["services"]
    ui.render_or_json(output, result.data, lambda: ui.table(
        None, ["service", "state", "detail"],
        [[r["service"], ui.styled(r["state"]), r["detail"]] for r in rows]))
    raise typer.Exit(result.code)


@app.command()
def stop(names: NamesArg = None, colour: ColourOption = None,
         output: OutputOption = ui.Output.text) -> None:
    """Stop services (SIGTERM: each finishes the message in hand)."""
    set_output(output)
    from opsctl.app import services

    result = services.stop(context(), names, colour)
    ui.render_or_json(output, result.data, lambda: ui.table(
        None, ["service", "result"],
        [[r["service"], ui.styled("stopped") if r["stopped"] else "not running"] for r in result.data["services"]]))


@app.command()
def status(names: NamesArg = None, colour: ColourOption = None,
           output: OutputOption = ui.Output.text) -> None:
    """Endpoint, health and restarts of each service. Exits 3 if one is not healthy."""
    set_output(output)
    from opsctl.app import services

    result = services.status(context(), names, colour)
    ui.render_or_json(output, result.data, lambda: ui.table(
        None, ["service", "endpoint", "health", "restarts", "detail"],
        [[h["component"], h["endpoint"], ui.styled(h["health"]), str(h["restarts"] or ""), h["detail"]]
         for h in result.data["services"]]))
    raise typer.Exit(result.code)


@app.command()
def logs(
    name: Annotated[str, typer.Argument(metavar="SERVICE", autocompletion=_complete_service)],
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Lines to show.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    colour: ColourOption = None,
) -> None:
    """Print the last lines of a service's log (and follow it with -f)."""
    from opsctl.app import services

    with open(services.logfile(context(), name, colour), errors="replace") as f:
        for line in f.readlines()[-lines:] if lines else []:
            ui.out(line, end="")
        while follow:
            line = f.readline()
            if line:
                ui.out(line, end="")
            else:
                time.sleep(0.25)
