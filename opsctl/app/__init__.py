"""What a command does, between the command that parses and renders it and the components
and targets that do the work: each function takes the run context and the parsed options
and returns a Result (the data a command renders, or prints as JSON, and the exit code).
May import components, the engine and opsctl.targets (the interface); never a command or
opsctl.ui."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from opsctl.errors import OK


@dataclass
class Result:
    data: dict[str, Any] = field(default_factory=dict)
    code: int = OK  # the process's exit code (opsctl.errors)


def in_parallel(items: list, call: Callable, at_most: int | None = None) -> list:
    """call(item) for every item at once (at most `at_most` threads), the results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(items), at_most or len(items)))) as pool:
        return list(pool.map(call, items))
