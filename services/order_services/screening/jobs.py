"""The screening jobs: train the VAE, score a file of orders, evaluate against a baseline.

    python -m order_services.screening train    --data ORDERS.jsonl --model DIR [--epochs N] [--seed S]
    python -m order_services.screening score    --data ORDERS.jsonl --model DIR --out SCORES.jsonl
    python -m order_services.screening evaluate --data LABELLED.jsonl [--epochs N] [--seed S]

Orders are JSON lines (the order document; where known, a `label`: "normal", an anomaly
kind, or "held" for validation). Training fits only the orders without a label or labelled
normal; the others still count in their customers' history. Every job reports on stdout
as JSON lines: {"event": "progress", ...} while it runs, then one {"event": "result", ...};
an error is {"event": "error", "message": ...} with exit code 2 (bad input) or 1. opsctl
runs these and renders them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from order_services.files import write_atomic
from order_services.screening import features

NORMAL = "normal"


class InputError(Exception):
    """Bad input from the user: exit 2 with the message."""


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def report_epoch(epoch: int, epochs: int, loss: float) -> None:
    emit("progress", epoch=epoch, epochs=epochs, loss=round(loss, 5))


def read_orders(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    orders = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            order = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not JSON ({e.msg}); expected one order per line") from None
        if not isinstance(order, dict):
            raise InputError(f"{path}:{number}: expected an order object, got {type(order).__name__}")
        orders.append(order)
    if not orders:
        raise InputError(f"{path} holds no orders")
    return orders


def train(args) -> dict:
    from order_services.screening import model

    everything = read_orders(args.data)
    orders = [o for o in everything if o.get("label", NORMAL) == NORMAL]
    try:
        screen = model.train(orders, history=everything, epochs=args.epochs, seed=args.seed, target_fpr=args.target_fpr,
                             on_epoch=report_epoch)
    except (ValueError, features.BadOrder) as e:
        raise InputError(str(e)) from None
    screen.save(args.model)
    return {"model": str(args.model), "threshold": screen.threshold, **screen.info}


def score(args) -> dict:
    from order_services.screening import model

    screen = model.Screen.load(args.model)
    orders = read_orders(args.data)
    scores, refused = screen.score_orders(orders)
    out, flagged = [], 0
    for index, order in enumerate(orders):
        record = {"order_id": order.get("order_id") or order.get("_id")}
        if index in refused:
            record.update(flagged=None, error=refused[index])
        else:
            value = float(scores[index])
            record.update(score=round(value, 6), flagged=value > screen.threshold)
            flagged += record["flagged"]
        out.append(json.dumps(record))
    write_atomic(args.out, "\n".join(out) + "\n")
    return {"orders": len(orders), "scored": len(orders) - len(refused), "flagged": flagged, "unusable": len(refused),
            "threshold": screen.threshold, "out": str(args.out)}


def evaluate(args) -> dict:
    """VAE and IsolationForest on the same split: trained on 60 % of the normal orders,
    tested on the other 40 % and every anomaly; ROC-AUC and PR-AUC overall and per kind."""
    import numpy as np
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import average_precision_score, roc_auc_score

    from order_services.screening import model

    orders = read_orders(args.data)
    labels = [o.get("label") for o in orders]
    if NORMAL not in labels or all(label in (None, NORMAL) for label in labels):
        raise InputError(f"{args.data} needs labelled orders: a `label` of normal or an anomaly kind "
                         "on each (opsctl orders generate writes such a file)")
    rng = np.random.default_rng(args.seed)
    normal = [i for i, label in enumerate(labels) if label == NORMAL]
    fit = set(rng.choice(normal, size=int(len(normal) * 0.6), replace=False).tolist())
    screen = model.train([orders[i] for i in sorted(fit)], history=orders, epochs=args.epochs, seed=args.seed,
                         on_epoch=report_epoch)
    # Features over the whole file: a customer's history includes every order in it.
    x, bad = features.matrix(orders, screen.schema)
    refused = dict(bad)
    usable = [i for i in range(len(orders)) if i not in refused]
    row = {index: n for n, index in enumerate(usable)}
    train_rows = [row[i] for i in sorted(fit) if i in row]
    test = [i for i in usable if i not in fit]
    forest = IsolationForest(n_estimators=200, random_state=args.seed)
    forest.fit((x[train_rows] - screen.mean) / screen.scale)
    test_x = x[[row[i] for i in test]]
    scores = {"vae": screen.scores(test_x),
              "isolation_forest": -forest.score_samples((test_x - screen.mean) / screen.scale)}
    test_labels = [labels[i] for i in test]
    kinds = sorted({label for label in test_labels if label != NORMAL})
    table = []
    for kind in ["all", *kinds]:
        keep = [n for n, label in enumerate(test_labels) if label == NORMAL or kind in ("all", label)]
        truth = [test_labels[n] != NORMAL for n in keep]
        entry = {"kind": kind, "anomalies": sum(truth), "normal": len(keep) - sum(truth)}
        for name, values in scores.items():
            entry[name] = {"roc_auc": round(float(roc_auc_score(truth, values[keep])), 4),
                           "pr_auc": round(float(average_precision_score(truth, values[keep])), 4)}
        table.append(entry)
    flagged = scores["vae"] > screen.threshold
    is_normal = np.array([label == NORMAL for label in test_labels])
    return {"orders": len(orders), "trained_on": len(train_rows), "tested_on": len(test),
            "unusable": len(bad), "table": table,
            "vae_at_threshold": {"false_positive_rate": round(float(flagged[is_normal].mean()), 4),
                                 "recall": round(float(flagged[~is_normal].mean()), 4)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m order_services.screening")
    jobs = parser.add_subparsers(dest="job", required=True)
    for name, runner in (("train", train), ("score", score), ("evaluate", evaluate)):
        job = jobs.add_parser(name)
        job.set_defaults(run=runner)
        job.add_argument("--data", type=Path, required=True)
        if name != "evaluate":
            job.add_argument("--model", type=Path, required=True)
        if name != "score":
            job.add_argument("--epochs", type=int, default=30)
            job.add_argument("--seed", type=int, default=7)
        if name == "train":
            job.add_argument("--target-fpr", type=float, default=0.01)
        if name == "score":
            job.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        emit("result", **args.run(args))
        return 0
    except (InputError, FileNotFoundError, ValueError) as e:
        emit("error", message=str(e))
        return 2
