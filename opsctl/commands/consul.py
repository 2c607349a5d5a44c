"""opsctl consul: the mesh's datacenters (one per colour) and their peering."""

from __future__ import annotations

from typing import Annotated

import typer

from opsctl import ui
from opsctl.commands import reconcile
from opsctl.commands.common import OutputOption, context, set_output

app = typer.Typer(help="Consul: each colour's datacenter, the peering between them, the mesh's "
                       "configuration entries.", no_args_is_help=True)


def _render(output: ui.Output, data: dict) -> None:
    def text() -> None:
        ui.table(None, ["colour", "datacenter", "health", "endpoint", "version", "peering"],
                 [[r["colour"], r["datacenter"], ui.styled(r["health"]), r["endpoint"], r["version"],
                   f"{r['peering']} with {r['peer']}" if r["peer"] else r["detail"]]
                  for r in data["datacenters"]])
        if data.get("services"):
            ui.table("Services in the mesh", ["datacenter", "service", "instance", "health", "checks"],
                     [[r["datacenter"], r["service"], r["instance"], ui.styled(r["health"]), r["checks"]]
                      for r in data["services"]])

    ui.render_or_json(output, data, text)


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


@app.command()
def apply(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes; make none.")] = False,
    output: OutputOption = ui.Output.text,
) -> None:
    """Write each datacenter's configuration entries as platform.yaml says (service-defaults,
    intentions, exported-services, service-resolver failover, proxy defaults, the ingress
    gateway), and delete those opsctl wrote that it no longer has."""
    set_output(output)
    from opsctl.app import config, mesh

    reconcile.render(config.apply([mesh.config_step(context(dry_run=dry_run))], dry_run), output, "consul")


@app.command()
def diff(output: OutputOption = ui.Output.text) -> None:
    """Drift between platform.yaml and the datacenters' configuration entries. Exits 0 in
    sync, 1 on drift, 2 on an error."""
    set_output(output)
    from opsctl.app import config, mesh

    reconcile.render(config.diff(lambda: [mesh.config_step(context(dry_run=True))]), output, "consul")
