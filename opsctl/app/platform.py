"""The platform's lifecycle: install (and its plan), status, down, fetch."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from typing import Callable

from opsctl.app import Result, in_parallel
from opsctl.components import all_steps, infrastructure, servers
from opsctl.components.base import Component, Server
from opsctl.components.services import every_instance
from opsctl.context import Context
from opsctl.errors import FAILED, INTERRUPTED, UNHEALTHY, OpsError, UsageError


def select_steps(ctx: Context, only: list[str], start: str | None, skip: list[str] = ()) -> list[Component]:
    """Steps named by --only (names or numbers, repeatable or comma-separated), --from
    and --skip, in install order."""
    components = all_steps(ctx)
    by_key = {}
    for c in components:
        by_key[c.name] = c
        by_key[str(c.number)] = c

    def lookup(key: str):
        if key not in by_key:
            valid = ", ".join(f"{c.number} {c.name}" for c in components)
            raise UsageError(f"unknown step '{key}'", f"steps are: {valid}")
        return by_key[key]

    def keys(items: list[str]) -> list[str]:
        return [k.strip() for item in items for k in item.split(",") if k.strip()]

    chosen = [lookup(k) for k in keys(only)] if keys(only) else list(components)
    skipped = {lookup(k).name for k in keys(list(skip))}
    chosen = [c for c in chosen if c.name not in skipped]
    if start is not None:
        first = lookup(start.strip()).number
        chosen = [c for c in chosen if c.number >= first]
    return sorted(set(chosen), key=lambda c: c.number)


def install(ctx: Context, steps: list[Component], board, parallel: int,
            note: Callable[[str], None]) -> Result:
    """Run the steps (a plan in a dry run), recorded in the state file so that an
    interrupted run is resumed; `board` (a context manager) sees each step's progress,
    `note` a resumption."""
    from opsctl.engine.runner import run_steps
    from opsctl.engine.state import StateFile, exclusive

    if ctx.dry_run:
        with board:
            results = run_steps(ctx, steps, None, board, parallel)
    else:
        with exclusive(ctx.state_dir / "opsctl.lock", "install"):
            state = StateFile(ctx.state_dir / "state.json")
            previous = state.unfinished_run()
            if previous:
                how = "unfinished" if previous["result"] == "running" else previous["result"]
                note(f"resuming after the {how} run {previous['id']}: steps already done report unchanged")
            state.begin("install", ctx.target, [s.name for s in steps])
            results = []
            try:
                with board:
                    results = run_steps(ctx, steps, state, board, parallel)
            finally:
                states = {r.state for r in results}
                state.finish("interrupted" if ctx.cancel.is_set() or "interrupted" in states
                             else "failed" if "failed" in states else "ok")
    interrupted = ctx.cancel.is_set() or any(r.state == "interrupted" for r in results)
    code = INTERRUPTED if interrupted else FAILED if any(r.state == "failed" for r in results) else 0
    return Result({"target": ctx.target, "dry_run": ctx.dry_run, "steps": [asdict(r) for r in results]}, code)


def status(ctx: Context) -> Result:
    """Every component, bundled service and the streaming job; exit 3 if any is not ok."""
    components = infrastructure(ctx) + every_instance(ctx)
    healths = in_parallel(components, lambda c: c.health(), at_most=8)
    return Result({"target": ctx.target, "components": [asdict(h) for h in healths]},
                  0 if all(h.ok for h in healths) else UNHEALTHY)


def down(ctx: Context, purge: bool) -> Result:
    """Stop the services, then the servers, then what runs them; with `purge` delete every
    server's data, logs, secrets and state (the download cache is kept)."""
    from opsctl.engine.state import exclusive

    # The services first: they hold connections to the servers.
    services = every_instance(ctx)
    components = servers(ctx)
    with exclusive(ctx.state_dir / "opsctl.lock", "down"):
        stopped = {s.name: was for s, was in zip(services, in_parallel(services, lambda s: s.stop()))}
        stopped.update(zip([c.name for c in components], in_parallel(components, lambda c: c.stop())))
        ctx.runtime.shutdown()  # nothing left to run them
        if purge:
            for component in [*services, *reversed(components)]:  # the cluster (kind) last
                component.purge()
            for entry in ctx.state_dir.iterdir() if ctx.state_dir.exists() else []:
                if entry.name not in ("cache", "opsctl.lock"):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return Result({"stopped": [n for n, was in stopped.items() if was], "purged": purge,
                   "components": [{"component": n, "stopped": was} for n, was in stopped.items()]})


def fetch(ctx: Context) -> Result:
    """Download and prepare what the servers need; check that the others are installed."""
    rows = []
    for component in [c for c in infrastructure(ctx) if isinstance(c, Server) or hasattr(c, "check_installed")]:
        try:
            ctx.runtime.prepare(component) if isinstance(component, Server) else component.check_installed()
            rows.append({"component": component.name, "ready": True, "detail": ""})
        except OpsError as e:
            rows.append({"component": component.name, "ready": False,
                         "detail": f"{e.message}; {e.hint}" if e.hint else e.message})
    return Result({"components": rows, "cache": str(ctx.cache_dir)},
                  0 if all(r["ready"] for r in rows) else FAILED)
