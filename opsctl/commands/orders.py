"""opsctl orders: traffic for the order API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from opsctl import ui
from opsctl.commands.common import OutputOption, context, set_output
from opsctl.errors import UsageError

app = typer.Typer(help="Orders: simulated, authenticated traffic for the order API.",
                  no_args_is_help=True)


@app.command()
def simulate(
    rate: Annotated[float, typer.Option(min=0.1, max=10000, help="Orders per second.")] = 10,
    duration: Annotated[float, typer.Option(min=0.1, max=3600, help="Seconds to run.")] = 10,
    anomaly_rate: Annotated[float, typer.Option(
        min=0, max=1, help="Share of orders that are anomalies (price, quantity, category, burst).")] = 0.0,
    concurrency: Annotated[int, typer.Option(min=1, max=2000, help="Requests in flight at most.")] = 256,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the order generator.")] = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Send authenticated orders at a steady rate; live progress, then a summary.
    Exits 1 if any order was not accepted."""
    set_output(output)
    from opsctl.app import orders

    with ui.live_line(output) as show:
        def tick(result) -> None:
            p99 = result.percentile(0.99)
            show(f"sent {result.sent}/{result.planned}  accepted {result.accepted}  "
                 f"rejected {sum(result.rejected.values())}  errors {sum(result.errors.values())}"
                 f"  p99 {p99 * 1000 if p99 else 0:.1f} ms")

        result = orders.simulate(context(), rate, duration, anomaly_rate, concurrency, seed, tick)
    summary = dict(result.data)
    url = summary.pop("url")
    if output == ui.Output.json:
        ui.print_json(summary)
    else:
        lat = summary["latency_ms"]
        ui.table(f"orders simulate: {rate:g}/s for {duration:g} s", ["", "value"], [
            ["order API", url], ["sent", summary["sent"]], ["accepted", summary["accepted"]],
            ["rejected", ", ".join(f"{k}: {v}" for k, v in summary["rejected"].items()) or 0],
            ["errors", ", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or 0],
            ["anomalies sent", ", ".join(f"{k}: {v}" for k, v in summary["anomalies"].items()) or 0],
            ["achieved rate", f"{summary['rate_per_s']}/s"],
            ["latency p50 / p99 / max", f"{lat['p50']} / {lat['p99']} / {lat['max']} ms"],
        ])
    raise typer.Exit(result.code)


@app.command()
def generate(
    count: Annotated[int, typer.Option(min=1, max=10_000_000, help="How many orders.")] = 10000,
    anomaly_rate: Annotated[float, typer.Option(
        min=0, max=1, help="Share of orders that start an anomaly (a burst adds several).")] = 0.05,
    rate: Annotated[float, typer.Option(min=0.01, max=100000, help="Orders per second of the simulated traffic (match what the model will see).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same file.")] = 1,
    out: Annotated[Path, typer.Option(help="The JSON-lines file to write.")] = Path("orders.jsonl"),
    output: OutputOption = ui.Output.text,
) -> None:
    """Write labelled orders (as stored, with created_at and a `label`: normal or the anomaly
    kind) for training and evaluating the screening model offline."""
    set_output(output)
    from opsctl.app import orders

    data = orders.generate(context(), count, anomaly_rate, seed, rate, out).data
    ui.render_or_json(output, data, lambda: ui.table(
        f"{count} orders in {out}", ["label", "orders"], sorted(data["labels"].items())))


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="The JSON-lines file to write.")] = Path("orders.jsonl"),
    output: OutputOption = ui.Output.text,
) -> None:
    """Write the stored regular orders (MongoDB, as the CDC bridge streams them) to a file,
    for scoring or training offline."""
    set_output(output)
    from opsctl.app.orders import export_orders

    count = export_orders(context(), out)
    ui.render_or_json(output, {"out": str(out), "orders": count},
                      lambda: ui.info(f"{count} orders written to {out}"))


# --- dead letters -------------------------------------------------------------------------

dead_letters = typer.Typer(
    help="Orders a consumer could never store (queue orders-dead-letter): list, show, "
         "redrive, drop. Without a verb: list.", invoke_without_command=True)
app.add_typer(dead_letters, name="dead-letters")

IdsArgument = Annotated[list[str], typer.Argument(
    metavar="ID...", help="Dead-letter ids (the order_id, as `list` shows them).")]


def _letters_table(title: str, letters: list[dict]) -> None:
    ui.table(title, ["id", "type", "from queue", "reason", "dead-lettered at"],
             [[d["id"], d["type"], d["queue"], d["reason"], d["dead_lettered_at"]]
              for d in letters])


@dead_letters.callback()
def dead_letters_default(typer_ctx: typer.Context, output: OutputOption = ui.Output.text) -> None:
    if typer_ctx.invoked_subcommand is None:
        list_dead_letters(output=output)


@dead_letters.command("list")
def list_dead_letters(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Read at most this many.")] = 10_000,
    output: OutputOption = ui.Output.text,
) -> None:
    """Every dead letter: order id, type, the queue it came from, why, when."""
    set_output(output)
    from opsctl.app import dead_letters as dl

    found = dl.list_letters(context(), limit)
    if output == ui.Output.json:
        return ui.print_json(found)
    if not found["letters"]:
        return ui.info(f"{found['queue']} is empty")
    _letters_table(f"{found['count']} dead letter(s) in {found['queue']}"
                   f"{' (more not shown)' if found['more'] else ''}", found["letters"])


@dead_letters.command()
def show(
    letter_id: Annotated[str, typer.Argument(metavar="ID", help="A dead-letter id (see list).")],
    output: OutputOption = ui.Output.text,
) -> None:
    """The whole message: its document, properties and headers."""
    set_output(output)
    from opsctl.app import dead_letters as dl

    letters = dl.show(context(), letter_id)
    if output == ui.Output.json:
        return ui.print_json(letters if len(letters) > 1 else letters[0])
    for letter in letters:
        ui.table(f"dead letter {letter['id']}", ["", "value"], [
            ["order id", letter["order_id"] or ""], ["type", letter["type"]],
            ["from queue", letter["queue"]], ["routing key", letter["routing_key"]],
            ["reason", letter["reason"]], ["dead-lettered at", letter["dead_lettered_at"]],
            *[[f"property {k}", v] for k, v in letter["properties"].items()],
            *[[f"header {k}", v] for k, v in letter["headers"].items()]])
        ui.out(letter["body"]) if isinstance(letter["body"], str) else ui.out_json(letter["body"])


@dead_letters.command()
def redrive(ids: IdsArgument, output: OutputOption = ui.Output.text) -> None:
    """Publish them again to order-exchange with their routing key (their type); once the
    broker confirmed, take them off the dead-letter queue."""
    set_output(output)
    from opsctl.app import dead_letters as dl

    result = dl.redrive(context(), ids)
    if output == ui.Output.json:
        return ui.print_json(result)
    _letters_table(f"{len(result['redriven'])} dead letter(s) redriven to their queue",
                   result["redriven"])
    if result["warning"]:
        ui.info(f"warning: {result['warning']}")


@dead_letters.command()
def drop(
    ids: IdsArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    output: OutputOption = ui.Output.text,
) -> None:
    """Remove them from the dead-letter queue for good (asks first, unless --yes)."""
    set_output(output)
    from opsctl.app import dead_letters as dl

    if not yes and not ui.confirm(f"Drop {len(ids)} dead letter(s) for good: {', '.join(ids)}?"):
        raise UsageError("dropping deletes the orders for good; nothing was dropped",
                         "confirm at the prompt, or pass --yes")
    result = dl.drop(context(), ids)
    ui.render_or_json(output, result, lambda: _letters_table(
        f"{len(result['dropped'])} dead letter(s) dropped", result["dropped"]))
