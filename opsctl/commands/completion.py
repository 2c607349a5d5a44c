"""opsctl completion: the shell completion script, as kubectl, helm and gh print theirs."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from opsctl import ui

COMPLETE_VAR = "_OPSCTL_COMPLETE"  # set by the script when the shell asks for completions


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the completion script for a shell.

    Load it in the current shell: `source <(opsctl completion bash)` (zsh: \
`source <(opsctl completion zsh)`); for every new shell add that line to ~/.bashrc or ~/.zshrc. \
fish: `opsctl completion fish > ~/.config/fish/completions/opsctl.fish`.
    """
    from typer.completion import get_completion_script

    ui.out(get_completion_script(prog_name="opsctl", complete_var=COMPLETE_VAR, shell=shell.value))
