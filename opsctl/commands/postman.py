"""opsctl postman: a Postman collection of the order APIs, with automatic tokens."""

from __future__ import annotations

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output

app = typer.Typer(help="Postman: export the order APIs as a collection.", no_args_is_help=True)


@app.command()
def export(
    file: str = typer.Argument(..., metavar="FILE", help="Where to write the collection (JSON)."),
    output: OutputOption = ui.Output.text,
) -> None:
    """Write a Postman v2.1 collection whose pre-request script fetches a token by itself.

    Its requests go to the edge (nginx), which routes them to the services. Pair it with
    an environment from `opsctl token --postman-env ENV_FILE`.
    """
    set_output(output)
    from opsctl.app import identity

    result = identity.postman_collection(context(), file)
    ui.render_or_json(output, result.data,
                      lambda: ui.info(f"collection written: {file}\n"
                                      f"environment: opsctl token --postman-env ENV_FILE"))
