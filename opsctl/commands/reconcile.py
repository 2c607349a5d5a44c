"""apply / diff for the configuration steps (Keycloak realm, Vault auth, credentials)."""

from __future__ import annotations

from typing import Callable

import typer

from opsctl import ui
from opsctl.errors import FAILED, USAGE, OpsError


def run(steps, dry_run: bool, output: ui.Output, what: str) -> list:
    """Plan (and unless dry_run, apply) each step's changes; print them."""
    changes = [change for step in steps for change in step.changes(apply=not dry_run)]
    rows = [{"action": c.action, "object": c.target, "detail": c.detail} for c in changes]
    if output == ui.Output.json:
        ui.print_json({"dry_run": dry_run, "in_sync": not changes, "changes": rows})
    elif not changes:
        ui.info(f"{what}: in sync, nothing to change")
    else:
        verb = "would change" if dry_run else "changed"
        marks = {"create": "+", "update": "~"}
        ui.table(f"{what}: {verb} {len(changes)}", ["", "object", "detail"],
                 [[marks.get(r["action"], r["action"]), r["object"], r["detail"]] for r in rows])
    return changes


def diff(steps: Callable[[], list], output: ui.Output, what: str) -> None:
    """Like kubectl diff and diff(1): exit 0 when in sync, 1 when something differs, 2 or
    more when the comparison could not be made (a server down, a bad file), so that a
    script reading 1 always sees drift."""
    try:
        changed = run(steps(), True, output, what)
    except OpsError as e:
        e.code = max(e.code, USAGE)
        raise
    if changed:
        raise typer.Exit(FAILED)
