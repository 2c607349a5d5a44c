"""opsctl images: the container image of the kubernetes target's services."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output

app = typer.Typer(help="Container images: build the services' image for the kubernetes target.",
                  no_args_is_help=True)


@app.command()
def build(
    image: Annotated[Optional[str], typer.Option(
        "--image", metavar="REPOSITORY:TAG",
        help="Its name [default: kubernetes.services_image of platform.yaml, tagged with the services' version].")] = None,
    push: Annotated[bool, typer.Option("--push", help="Push it to its registry after the build.")] = False,
    builder: Annotated[Optional[str], typer.Option(
        "--builder", metavar="docker|buildah", help="The builder [default: docker, else buildah].")] = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Build the one image of every bundled service and the streaming job
    (services/images/order-services), with docker or buildah; the builder's output goes to
    stderr. Where opsctl's kind cluster runs, the image is loaded into it.
    """
    set_output(output)
    from opsctl.app import images
    from opsctl.errors import UsageError

    if builder not in (None, *images.BUILDERS):
        raise UsageError(f"unknown builder {builder!r}", "use --builder docker or --builder buildah")
    r = images.build(context("kubernetes", reach=False), image, push, builder).data
    ui.render_or_json(output, r, lambda: ui.info(
        f"built {r['image']} with {r['builder']}" + (", pushed" if r["pushed"] else "")
        + (f", loaded into kind cluster {r['loaded_into_kind']}" if r["loaded_into_kind"] else "")))
