"""The typer root: global options and command groups, nothing else."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from opsctl import __version__
from opsctl.commands import (bluegreen as bluegreen_cmd, completion as completion_cmd, config as config_cmd, consul as consul_cmd,
                             images as images_cmd, jobs as jobs_cmd, keycloak as keycloak_cmd, orders as orders_cmd,
                             platform as platform_cmd, postman as postman_cmd, queues as queues_cmd,
                             services as services_cmd, token as token_cmd, vault as vault_cmd)

HELP = """Stand up and operate the AI-assisted order-management platform.

Exit codes: 0 ok, 1 failed, 2 usage or bad input, 3 unhealthy, 130 interrupted.
"""

app = typer.Typer(
    name="opsctl",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"opsctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    config: Optional[str] = typer.Option(
        None, "--config", "-c", envvar="OPSCTL_CONFIG", metavar="FILE",
        help="Override file merged over platform.yaml \\[default: ./opsctl.yaml if present]."),
    no_color: bool = typer.Option(False, "--no-color", help="No colours (also when NO_COLOR is set)."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="Only data and errors: no progress or notes on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    from opsctl import ui
    from opsctl.commands import common

    common.CONFIG_FILE = config
    ui.configure(color=not no_color, quiet=quiet)


PLATFORM = "Platform"
app.command(rich_help_panel=PLATFORM)(platform_cmd.install)
app.command(rich_help_panel=PLATFORM)(platform_cmd.status)
app.command(rich_help_panel=PLATFORM)(platform_cmd.down)
app.command(rich_help_panel=PLATFORM)(platform_cmd.fetch)
IDENTITY = "Identity and secrets"
app.command(rich_help_panel=IDENTITY)(token_cmd.token)
app.add_typer(keycloak_cmd.app, name="keycloak", rich_help_panel=IDENTITY)
app.add_typer(vault_cmd.app, name="vault", rich_help_panel=IDENTITY)
app.add_typer(postman_cmd.app, name="postman", rich_help_panel=IDENTITY)
ORDER_FLOW = "Order flow"
app.add_typer(queues_cmd.app, name="queues", rich_help_panel=ORDER_FLOW)
app.add_typer(services_cmd.app, name="services", rich_help_panel=ORDER_FLOW)
app.add_typer(orders_cmd.app, name="orders", rich_help_panel=ORDER_FLOW)

app.add_typer(consul_cmd.app, name="consul", rich_help_panel="Mesh")
app.add_typer(bluegreen_cmd.app, name="bluegreen", rich_help_panel="Mesh")

app.add_typer(jobs_cmd.app, name="jobs", rich_help_panel="AI screening")
app.add_typer(images_cmd.app, name="images", rich_help_panel="Configuration")
app.add_typer(config_cmd.app, name="config", rich_help_panel="Configuration")
app.command(rich_help_panel="Configuration")(completion_cmd.completion)


def main() -> None:
    import os

    from opsctl.commands.common import run_cli

    # Everything opsctl writes (.opsctl/: secrets, state, logs, data) is its owner's only;
    # the processes it starts inherit this.
    os.umask(0o077)
    if completion_cmd.COMPLETE_VAR in os.environ:  # the shell asks for completions
        from typer.completion import completion_init

        completion_init()
    sys.exit(run_cli(app))
