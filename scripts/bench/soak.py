#!/usr/bin/env python3
"""Soak of the whole platform on the local target, as a user runs it: every server, every
bundled service and the screening stream on, orders through the edge at a steady rate for
--minutes, then the books are balanced exactly:

    accepted (201 from the API)  = stored (PostgreSQL priority_orders + MongoDB orders +
                                   digital_orders) + dead-lettered (orders-dead-letter)
    stored regular orders        = screened (validation set) + dead-lettered by the stream

and the resident memory of every supervised process (with its children) at the start and
at the end, and how long the consumers and the stream took to catch up after the load.

Installs the platform with its services in a fresh working directory on free ports,
trains the model on generated orders and starts the stream, then purges it all.
Usage: .venv/bin/python scripts/bench/soak.py [--rate 120] [--minutes 10] [--anomaly-rate 0.05]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from books import caught_up, everything_on  # noqa: E402
from tests.integration.conftest import Workdir, port_override, reachable_dir, workdir_context  # noqa: E402


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    family, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    total = 0
    for member in family:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def memory(work: Workdir) -> dict[str, float]:
    from opsctl.components import servers
    from opsctl.components.services import every_instance

    ctx = workdir_context(work)
    processes = [ctx.runtime.process(s) for c in servers(ctx) for s in c.servers()]
    processes += [ctx.runtime.process(s) for i in every_instance(ctx) for s in [i, i.sidecar] if s]
    return {p.name: round(tree_rss_mib(pid), 1) for p in processes if (pid := p.pid())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=120, help="orders per second (default 120; orders simulate tops out near 235)")
    parser.add_argument("--minutes", type=float, default=10, help="length of the load (default 10)")
    parser.add_argument("--anomaly-rate", type=float, default=0.05, help="share of anomalies (default 0.05)")
    args = parser.parse_args()
    work = Workdir(reachable_dir("opsctl-soak-"), port_override())
    try:
        everything_on(work, args.rate)
        start_memory = memory(work)
        load = work.run("orders", "simulate", "--rate", f"{args.rate:g}", "--duration",
                        f"{args.minutes * 60:g}", "--anomaly-rate", f"{args.anomaly_rate:g}",
                        "-o", "json", check_json=True, timeout=args.minutes * 60 + 600)
        summary = load.json
        lag, seen = caught_up(work, summary["accepted"])
        end_memory = memory(work)
        status = work.run("status", "-o", "json", check_json=True).json["components"]
    finally:
        work.remove()
    stored = seen["priority"] + seen["regular"] + seen["digital"]
    result = {"load": summary, "books": seen, "caught_up_after_s": round(lag, 1),
              "balanced": stored + seen["dead_lettered"] == summary["accepted"]
                          and seen["screened"] + seen["stream_dead_lettered"] == seen["regular"],
              "restarts": {r["component"]: r["restarts"] for r in status if r.get("restarts")},
              "memory_mib": {n: [start_memory.get(n), end_memory.get(n)] for n in sorted(end_memory)}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
