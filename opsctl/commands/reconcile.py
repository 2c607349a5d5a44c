"""How apply and diff of the configuration steps are shown (opsctl.app.config does them)."""

from __future__ import annotations

import typer

from opsctl import ui
from opsctl.app import Result


def render(result: Result, output: ui.Output, what: str) -> None:
    """The changes (made, or that would be made), then the result's exit code."""
    data = result.data
    if output == ui.Output.json:
        ui.print_json(data)
    elif data["in_sync"]:
        ui.info(f"{what}: in sync, nothing to change")
    else:
        verb = "would change" if data["dry_run"] else "changed"
        marks = {"create": "+", "update": "~", "delete": "-"}
        ui.table(f"{what}: {verb} {len(data['changes'])}", ["", "object", "detail"],
                 [[marks.get(r["action"], r["action"]), r["object"], r["detail"]] for r in data["changes"]])
    raise typer.Exit(result.code)
