"""install, status, down: the platform's lifecycle."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Annotated, List, Optional

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output
from opsctl.errors import FAILED, INTERRUPTED, UNHEALTHY, UsageError


def _select(components, only: list[str], start: str | None, skip: list[str] = ()):
    """Steps named by --only (names or numbers, repeatable or comma-separated), --from
    and --skip."""
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


def install(
    target: Annotated[Optional[str], typer.Option(
        "--target", "-t", help="local or kubernetes [default: platform.target]")] = None,
    only: Annotated[Optional[List[str]], typer.Option(
        "--only", metavar="STEP", help="Run only these steps (name or number; repeat or comma-separate).")] = None,
    start: Annotated[Optional[str], typer.Option(
        "--from", metavar="STEP", help="Start at this step (name or number).")] = None,
    skip: Annotated[Optional[List[str]], typer.Option(
        "--skip", metavar="STEP", help="Leave these steps out (name or number; repeat or comma-separate).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    parallel: Annotated[int, typer.Option(min=1, max=16, help="Steps run at once.")] = 4,
    output: OutputOption = ui.Output.text,
) -> None:
    """Install the platform: run the numbered steps in order, skipping what is already done."""
    set_output(output)
    if target not in (None, "local", "kubernetes"):
        raise UsageError(f"unknown target '{target}'", "use --target local or --target kubernetes")
    from opsctl.components import all_steps
    from opsctl.engine.runner import run_steps
    from opsctl.engine.state import StateFile, exclusive

    ctx = context(target, dry_run)
    components = _select(all_steps(ctx), only or [], start, skip or [])
    steps = [(c.number, c.name) for c in components]
    title = f"{'plan' if dry_run else 'install'} — target {ctx.target}"
    board = ui.StepBoard(steps, title, enabled=output == ui.Output.text)
    if dry_run:
        with board:
            results = run_steps(ctx, components, None, board, parallel)
    else:
        with exclusive(ctx.state_dir / "opsctl.lock", "install"):
            state = StateFile(ctx.state_dir / "state.json")
            previous = state.unfinished_run()
            if previous and output == ui.Output.text:
                how = "unfinished" if previous["result"] == "running" else previous["result"]
                ui.info(f"resuming after the {how} run {previous['id']}: "
                        "steps already done report unchanged")
            state.begin("install", ctx.target, [name for _, name in steps])
            results = []
            try:
                with board:
                    results = run_steps(ctx, components, state, board, parallel)
            finally:
                states = {r.state for r in results}
                state.finish("interrupted" if ctx.cancel.is_set() or "interrupted" in states
                             else "failed" if "failed" in states else "ok")
    _report(results, output, ctx)


def _report(results, output: ui.Output, ctx) -> None:
    failed = [r for r in results if r.state == "failed"]
    interrupted = ctx.cancel.is_set() or any(r.state == "interrupted" for r in results)
    if output == ui.Output.json:
        ui.print_json({"target": ctx.target, "dry_run": ctx.dry_run,
                       "steps": [asdict(r) for r in results]})
    else:
        for r in failed:
            ui.error(f"step {r.number} {r.name} failed: {r.detail}")
        counts = {}
        for r in results:
            counts[r.state] = counts.get(r.state, 0) + 1
        ui.info(", ".join(f"{n} {s}" for s, n in counts.items()))
    if interrupted:
        raise typer.Exit(INTERRUPTED)
    if failed:
        raise typer.Exit(FAILED)


def status(
    output: OutputOption = ui.Output.text,
) -> None:
    """Show every component, bundled service and the streaming job: endpoint, health,
    version, restarts and last error. Exits 3 if any is unhealthy or down."""
    set_output(output)
    from opsctl.components import infrastructure
    from opsctl.components.services import BundledService

    ctx = context()
    components = infrastructure(ctx) + [BundledService(name, ctx) for name in ctx.spec.services]
    with ThreadPoolExecutor(max_workers=8) as pool:
        healths = list(pool.map(lambda c: c.health(), components))
    rows = [[str(h.step), h.component, h.endpoint, ui.styled(h.health), h.version,
             str(h.restarts or ""), h.detail] for h in healths]

    def render() -> None:
        ui.table(f"target {ctx.target}",
                 ["#", "component", "endpoint", "health", "version", "restarts", "detail"], rows)
        for h in healths:
            if h.last_error and not h.ok:
                ui.error(f"{h.component}: {h.last_error}")

    ui.render_or_json(output, {"target": ctx.target, "components": [asdict(h) for h in healths]}, render)
    if not all(h.ok for h in healths):
        raise typer.Exit(UNHEALTHY)


def down(
    purge: Annotated[bool, typer.Option(
        "--purge", help="Also delete all data, logs, secrets and state of the local platform.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --purge.")] = False,
    output: OutputOption = ui.Output.text,
) -> None:
    """Stop the local platform (and with --purge, delete its data)."""
    set_output(output)
    from opsctl.components import servers
    from opsctl.components.services import BundledService
    from opsctl.engine.state import exclusive

    ctx = context()
    if purge and not yes and not ui.confirm(
            f"Delete every server's data, logs and secrets under {ctx.state_dir}?"):
        raise UsageError("--purge deletes all data of the local platform; nothing was deleted",
                         "confirm at the prompt, or pass --yes")
    # The services first: they hold connections to the servers.
    services = [BundledService(name, ctx) for name in ctx.spec.services]
    components = servers(ctx)
    with exclusive(ctx.state_dir / "opsctl.lock", "down"):
        with ThreadPoolExecutor(max_workers=len(services)) as pool:
            stopped = dict(zip([s.name for s in services], pool.map(lambda s: s.stop(), services)))
        with ThreadPoolExecutor(max_workers=max(1, len(components))) as pool:
            stopped.update(zip([c.name for c in components], pool.map(lambda c: c.stop(), components)))
        ctx.runtime.shutdown()  # nothing left to run them
        if purge:
            for component in [*services, *components]:
                component.purge()
            for entry in ctx.state_dir.iterdir() if ctx.state_dir.exists() else []:
                if entry.name not in ("cache", "opsctl.lock"):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    rows = [[name, ui.styled("stopped") if was else "not running"] for name, was in stopped.items()]
    ui.render_or_json(output, {"stopped": [n for n, was in stopped.items() if was], "purged": purge},
                      lambda: ui.table(None, ["component", "result"], rows))
    if purge and output == ui.Output.text:
        ui.info(f"purged {ctx.state_dir} (downloaded artifacts kept)")


def fetch(output: OutputOption = ui.Output.text) -> None:
    """Download and prepare what the local servers need (Keycloak, Kafka, Spark's Kafka source) into the cache,
    and check that every other server is installed."""
    set_output(output)
    from opsctl.components import infrastructure
    from opsctl.errors import OpsError

    ctx = context()
    rows, problems = [], []
    for component in [c for c in infrastructure(ctx) if hasattr(c, "check_installed")]:
        try:
            component.check_installed()
            rows.append({"component": component.name, "ready": True, "detail": ""})
        except OpsError as e:
            rows.append({"component": component.name, "ready": False, "detail": e.hint or e.message})
            problems.append(component.name)
    ui.render_or_json(output, {"components": rows, "cache": str(ctx.cache_dir)}, lambda: ui.table(
        None, ["component", "state", "detail"],
        [[r["component"], ui.styled("ready" if r["ready"] else "failed"), r["detail"]] for r in rows]))
    if output == ui.Output.text:
        ui.info(f"download cache: {ctx.cache_dir}")
    if problems:
        raise typer.Exit(FAILED)
