"""opsctl services: the bundled order services as local processes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Annotated, List, Optional

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output
from opsctl.errors import FAILED, UNHEALTHY, UsageError

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


def _selected(ctx, names: list[str] | None, everything: bool = False) -> list[str]:
    """The services named, else those started with the platform (or all: `everything`)."""
    known = list(ctx.spec.services)
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise UsageError(f"unknown service(s): {', '.join(unknown)}", f"services are: {', '.join(known)}")
    return names or [n for n in known if everything or ctx.spec.services[n].autostart]


@app.command()
def start(names: NamesArg = None, output: OutputOption = ui.Output.text) -> None:
    """Start services (or restart those whose settings changed); waits until each is ready."""
    set_output(output)
    from opsctl.components import keycloak_realm, vault
    from opsctl.components.services import BundledService
    from opsctl.errors import OpsError

    ctx = context()
    client = vault.admin(ctx)
    rows, failed = [], False
    for name in _selected(ctx, names):
        try:
            secret = keycloak_realm.client_secret(ctx, name, client)
            outcome = BundledService(name, ctx, secret).reconcile()
            rows.append({"service": name, "state": outcome.state, "detail": outcome.detail})
        except OpsError as e:
            failed = True
            rows.append({"service": name, "state": "failed",
                         "detail": e.message + (f" ({e.hint})" if e.hint else "")})
    ui.render_or_json(output, {"services": rows}, lambda: ui.table(
        None, ["service", "state", "detail"],
        [[r["service"], ui.styled(r["state"]), r["detail"]] for r in rows]))
    if failed:
        raise typer.Exit(FAILED)


@app.command()
def stop(names: NamesArg = None, output: OutputOption = ui.Output.text) -> None:
    """Stop services (SIGTERM: each finishes the message in hand)."""
    set_output(output)
    from opsctl.components.services import BundledService

    ctx = context()
    services = [BundledService(name, ctx) for name in _selected(ctx, names, everything=True)]
    with ThreadPoolExecutor(max_workers=len(services)) as pool:
        stopped = list(pool.map(lambda s: s.stop(), services))
    rows = [{"service": s.name, "stopped": was} for s, was in zip(services, stopped)]
    ui.render_or_json(output, {"services": rows}, lambda: ui.table(
        None, ["service", "result"],
        [[r["service"], ui.styled("stopped") if r["stopped"] else "not running"] for r in rows]))


@app.command()
def status(names: NamesArg = None, output: OutputOption = ui.Output.text) -> None:
    """Endpoint, health and restarts of each service. Exits 3 if one is not healthy."""
    set_output(output)
    from opsctl.components.services import BundledService

    ctx = context()
    services = [BundledService(name, ctx) for name in _selected(ctx, names)]
    with ThreadPoolExecutor(max_workers=len(services)) as pool:
        healths = list(pool.map(lambda s: s.health(), services))
    ui.render_or_json(output, {"services": [asdict(h) for h in healths]}, lambda: ui.table(
        None, ["service", "endpoint", "health", "restarts", "detail"],
        [[h.component, h.endpoint, ui.styled(h.health), str(h.restarts or ""), h.detail] for h in healths]))
    if not all(h.ok for h in healths):
        raise typer.Exit(UNHEALTHY)


@app.command()
def logs(
    name: Annotated[str, typer.Argument(metavar="SERVICE", autocompletion=_complete_service)],
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="Lines to show.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
) -> None:
    """Print the last lines of a service's log (and follow it with -f)."""
    from opsctl.components.services import BundledService

    ctx = context()
    _selected(ctx, [name])
    logfile = ctx.runtime.logfile(BundledService(name, ctx))
    if not logfile.exists():
        raise UsageError(f"{name} has no log yet ({logfile})", f"start it: opsctl services start {name}")
    with open(logfile, errors="replace") as f:
        for line in f.readlines()[-lines:] if lines else []:
            ui.out(line, end="")
        while follow:
            line = f.readline()
            if line:
                ui.out(line, end="")
            else:
                time.sleep(0.25)
