"""opsctl config: see and check the effective platform spec."""

from __future__ import annotations

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, load_spec, override_file, set_output

app = typer.Typer(help="See and check the platform spec (platform.yaml + opsctl.yaml).",
                  no_args_is_help=True)


@app.command()
def view(output: OutputOption = ui.Output.text) -> None:
    """Print the effective spec: platform.yaml with opsctl.yaml merged over it."""
    set_output(output)
    data = load_spec().model_dump(mode="json")
    if output == ui.Output.json:
        ui.print_json(data)
    else:
        import yaml

        ui.out(yaml.safe_dump(data, sort_keys=False), end="")


@app.command()
def validate(output: OutputOption = ui.Output.text) -> None:
    """Check the spec; exit 2 with every problem listed if it is invalid."""
    set_output(output)
    load_spec()
    source = override_file()
    ui.render_or_json(output, {"valid": True, "override": str(source) if source else None},
                      lambda: ui.info(f"valid{f' (with {source})' if source else ''}"))
