"""What a command does, between the command that parses and renders it and the components
and targets that do the work: each function takes the run context and the parsed options
and returns a Result (the data a command renders, or prints as JSON, and the exit code).
May import components, the engine and opsctl.targets (the interface); never a command or
opsctl.ui."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opsctl.errors import OK


@dataclass
class Result:
    data: dict[str, Any] = field(default_factory=dict)
    code: int = OK  # the process's exit code (opsctl.errors)
