"""The one place that prints: rich tables and progress for people, JSON for scripts."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from enum import Enum
from typing import Any, Callable, Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text


class Output(str, Enum):
    text = "text"
    json = "json"



def _consoles(plain: bool = False) -> tuple[Console, Console]:
    """stdout for data, stderr for messages and progress; `plain`: no ANSI styles at all."""
    style = {"color_system": None} if plain else {}
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns; logs read better wide.
    return (Console(highlight=False, width=None if sys.stdout.isatty() else 160, **style),
            Console(stderr=True, highlight=False, soft_wrap=True, **style))  # messages stay greppable


console, err_console = _consoles()
QUIET = False  # -q: progress, live displays and notes on stderr are left out


def configure(color: bool, quiet: bool) -> None:
    """The root options: --no-color (or NO_COLOR set, https://no-color.org) and -q/--quiet."""
    global QUIET, console, err_console
    QUIET = quiet
    if not color or os.environ.get("NO_COLOR"):
        console, err_console = _consoles(plain=True)


STATE_STYLE = {
    "pending": "dim",
    "running": "cyan",
    "planned": "blue",
    "unchanged": "green",
    "changed": "yellow",
    "skipped": "dim",
    "failed": "bold red",
    "interrupted": "magenta",
    "healthy": "green",
    "ready": "green",
    "unhealthy": "bold red",
    "stopped": "yellow",
    "n/a": "dim",
}


def styled(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def out(text: str, end: str = "\n") -> None:
    """Text on stdout exactly as given (a token, a log line, a script): no markup, no wrapping."""
    sys.stdout.write(text + end)
    sys.stdout.flush()


def out_json(value: Any) -> None:
    """A JSON value for a person to read (coloured on a terminal)."""
    console.print_json(data=value)


@contextlib.contextmanager
def progress(title: str, unit: str, output: Output):
    """A progress bar on a terminal's stderr, for text output only (else nothing); yields
    update(done, total, note)."""
    if output != Output.text or QUIET or not err_console.is_terminal:
        yield lambda done, total, note="": None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(title), BarColumn(), TextColumn(f"{{task.completed}}/{{task.total}} {unit}"),
                   TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=err_console)
    task = None

    def update(done: int, total: int, note: str = "") -> None:
        nonlocal task
        if task is None:
            task = bar.add_task(title, total=total, note="")
        bar.update(task, completed=done, note=note)

    with bar:
        yield update


@contextlib.contextmanager
def live_line(output: Output):
    """One line redrawn in place on a terminal's stderr, for text output only (else
    nothing); yields update(text)."""
    if output != Output.text or QUIET or not err_console.is_terminal:
        yield lambda text: None
        return
    from rich.live import Live

    with Live("", console=err_console, refresh_per_second=4) as live:
        yield live.update


def info(message: str) -> None:
    """A note for a person, on stderr (never mixed into data); none with -q."""
    if not QUIET:
        err_console.print(message)


def error(message: str, hint: str = "", code: int = 1, output: Output = Output.text) -> None:
    if output == Output.json:
        print_json({"error": {"message": message, "hint": hint, "exit_code": code}})
        return
    err_console.print(Text("error: ", style="bold red") + Text(message))
    if hint:
        err_console.print(Text("hint: ", style="bold") + Text(hint))


# Columns whose values must stay whole (an endpoint cut in half is useless).
NO_WRAP = {"#", "component", "step", "endpoint", "health", "state", "version", "time"}


def table(title: str | None, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    t = Table(title=title, title_justify="left", header_style="bold")
    for col in columns:
        t.add_column(col, no_wrap=col in NO_WRAP)
    for row in rows:
        t.add_row(*(cell if isinstance(cell, Text) else Text(str(cell)) for cell in row))
    console.print(t)


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}s"


class StepBoard:
    """Live view of install steps: number, name, state, detail, duration.

    On a terminal it redraws one table; elsewhere (CI, pipes) it prints one line per
    finished step, so logs stay readable.
    """

    COLUMNS = ("#", "step", "state", "detail", "time")

    def __init__(self, steps: list[tuple[int, str]], title: str, enabled: bool = True):
        self.rows: dict[str, dict] = {
            name: {"number": n, "name": name, "state": "pending", "detail": "", "duration": None}
            for n, name in steps
        }
        self.started: dict[str, float] = {}
        self.title = title
        self.enabled = enabled
        self.live = None
        self.lock = threading.Lock()

    def __enter__(self) -> "StepBoard":
        if self.enabled and console.is_terminal and not QUIET:
            from rich.live import Live

            self.live = Live(self._render(), console=console, refresh_per_second=8)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def _render(self) -> Table:
        t = Table(title=self.title, title_justify="left", header_style="bold")
        for col in self.COLUMNS:
            t.add_column(col, no_wrap=col in NO_WRAP)
        now = time.monotonic()
        for row in self.rows.values():
            duration = row["duration"]
            if duration is None and row["name"] in self.started:
                duration = now - self.started[row["name"]]
            t.add_row(str(row["number"]), row["name"], styled(row["state"]), row["detail"],
                      _seconds(duration))
        return t

    def update(self, name: str, state: str, detail: str = "", duration: float | None = None):
        with self.lock:
            row = self.rows[name]
            row.update(state=state, detail=detail, duration=duration)
            if state == "running":
                self.started[name] = time.monotonic()
            if self.live:
                self.live.update(self._render())
            elif self.enabled and state not in ("pending", "running"):
                line = Text(f"{row['number']:>2} {name:<20} ") + styled(state)
                if detail:
                    line += Text(f"  {detail}")
                if duration is not None:
                    line += Text(f"  ({_seconds(duration)})", style="dim")
                console.print(line)


def confirm(question: str) -> bool:
    """Ask yes/no on a terminal; never blocks a script (no terminal: no)."""
    if not sys.stdin.isatty():
        return False
    return console.input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def render_or_json(output: Output, data: Any, render: Callable[[], None]) -> None:
    if output == Output.json:
        print_json(data)
    else:
        render()
