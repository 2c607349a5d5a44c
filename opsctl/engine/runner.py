"""Runs steps in their numbered order; independent ones in parallel.

A step starts when the steps it comes after are done; a step whose prerequisite failed
is skipped with that reason. Ctrl-C stops new steps from starting, lets the running
ones notice and stop waiting, records everything in the state file, and exits 130.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

from opsctl.components.base import Component, Outcome
from opsctl.context import Context
from opsctl.engine.state import StateFile
from opsctl.errors import Interrupted, OpsError

OK_STATES = ("planned", "unchanged", "changed", "skipped")


@dataclass
class StepResult:
    number: int
    name: str
    state: str
    detail: str = ""
    duration: float | None = None


def _run_one(component: Component) -> Outcome:
    try:
        return component.reconcile()
    except Interrupted:
        return Outcome("interrupted", "stopped waiting (Ctrl-C); the next run resumes")
    except OpsError as e:
        return Outcome("failed", e.message + (f"\nhint: {e.hint}" if e.hint else ""))
    except Exception as e:  # an unexpected bug in one step must not hide the others
        return Outcome("failed", f"{type(e).__name__}: {e}")


def run_steps(ctx: Context, components: list[Component], state: StateFile | None,
              board, parallel: int = 4) -> list[StepResult]:
    results: dict[str, StepResult] = {}
    selected = {c.name for c in components}
    pending = sorted(components, key=lambda c: c.number)
    running: dict[Future, tuple[Component, float]] = {}
    held_back: set[str] = set()  # skipped because a prerequisite failed: not a success either

    def finish(component: Component, outcome: Outcome, duration: float | None) -> None:
        result = StepResult(component.number, component.name, outcome.state, outcome.detail,
                            duration)
        results[component.name] = result
        board.update(component.name, outcome.state, outcome.detail.split("\n")[0], duration)
        if state and not ctx.dry_run:
            state.record(component.name, asdict(result))

    def blocker(component: Component) -> str | None:
        for dep in component.after:
            if dep not in selected:
                continue
            if dep not in results:
                return "wait"
            if results[dep].state not in OK_STATES or dep in held_back:
                return dep
        return None

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        try:
            while pending or running:
                for component in list(pending):
                    if ctx.cancel.is_set() or len(running) >= parallel:
                        break
                    blocked = blocker(component)
                    if blocked == "wait":
                        continue
                    pending.remove(component)
                    waits_on = [d for d in component.after
                                if d in results and results[d].state == "planned"]
                    if ctx.dry_run and waits_on:
                        # Nothing to inspect yet: it is configured once those are installed.
                        finish(component, Outcome("planned", f"after {', '.join(waits_on)}"), None)
                        continue
                    if blocked:
                        held_back.add(component.name)
                        finish(component, Outcome("skipped", f"needs {blocked}, which did not succeed"),
                               None)
                        continue
                    board.update(component.name, "running")
                    running[pool.submit(_run_one, component)] = (component, time.monotonic())
                if ctx.cancel.is_set() and not running:
                    break
                done, _ = wait(list(running), timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    component, started = running.pop(future)
                    finish(component, future.result(), time.monotonic() - started)
        except KeyboardInterrupt:
            ctx.cancel.set()
            # Let running steps notice the cancel and record where they stopped.
            for future, (component, started) in running.items():
                finish(component, future.result(), time.monotonic() - started)
            running.clear()
    for component in pending:
        results[component.name] = StepResult(component.number, component.name, "pending",
                                             "not started")
    return sorted(results.values(), key=lambda r: r.number)
