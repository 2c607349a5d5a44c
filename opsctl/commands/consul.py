"""opsctl consul: the mesh's datacenters (one per colour) and their peering."""

from __future__ import annotations

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output

app = typer.Typer(help="Consul: each colour's datacenter and the peering between them.",
                  no_args_is_help=True)


def _render(output: ui.Output, data: dict) -> None:
    ui.render_or_json(output, data, lambda: ui.table(
        None, ["colour", "datacenter", "health", "endpoint", "version", "peering"],
        [[r["colour"], r["datacenter"], r["health"], r["endpoint"], r["version"],
          f"{r['peering']} with {r['peer']}" if r["peer"] else r["detail"]] for r in data["datacenters"]]))


@app.command()
def status(output: OutputOption = ui.Output.text) -> None:
    """Each datacenter's agent and its side of the peering. Exits 3 unless both are healthy
    and the peering is ACTIVE."""
    set_output(output)
    from opsctl.app import mesh

    result = mesh.status(context(dry_run=True))
    _render(output, result.data)
    raise typer.Exit(result.code)


@app.command()
def peer(output: OutputOption = ui.Output.text) -> None:
    """Peer the two datacenters (blue accepts, green dials); does nothing when they are.
    Exits 3 if the peering is not ACTIVE afterwards."""
    set_output(output)
    from opsctl.app import mesh

    result = mesh.peer(context())
    if output != ui.Output.json:
        ui.info(result.data["changed"] or "already peered")
    _render(output, result.data)
    raise typer.Exit(result.code)
