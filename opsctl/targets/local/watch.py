"""supervisord's event listener for opsctl (see opsctl.targets.local.supervisor).

    python -m opsctl.targets.local.watch EVENTS_FILE LIMIT WINDOW_SECONDS START_RETRIES

Records every unexpected exit and every give-up (FATAL) of a program as a JSON line in
EVENTS_FILE, which `opsctl status` reads for restart counts and the last error; stops a
program that exited unexpectedly LIMIT times within WINDOW_SECONDS (supervisord alone would
restart it for ever) and records that as failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict, deque

GAVE_UP = "exited right after starting, {retries} retries in a row; supervisord gave up"


def _record(path: str, event: dict) -> None:
    # One short line per write, appended: readers never see half of one.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def _stop(name: str) -> None:
    """Stop `name`, which supervisord is restarting: right after the exit it may still be
    EXITED (not yet stoppable) for a moment."""
    from supervisor import childutils

    rpc = childutils.getRPCInterface(os.environ).supervisor
    for _ in range(20):
        try:
            rpc.stopProcess(name, False)
            return
        except Exception as exc:  # NOT_RUNNING while between exit and restart
            error = exc
            time.sleep(0.25)
    print(f"could not stop {name}: {error}", file=sys.stderr, flush=True)


def main() -> None:
    from supervisor import childutils

    path, limit, window, retries = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    exits: dict[str, deque] = defaultdict(deque)
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        fields = childutils.get_headers(payload.split("\n", 1)[0])
        name, now = fields.get("processname", ""), time.time()
        if headers["eventname"] == "PROCESS_STATE_FATAL":
            _record(path, {"name": name, "time": now, "event": "failed",
                           "reason": GAVE_UP.format(retries=retries)})
        elif headers["eventname"] == "PROCESS_STATE_EXITED" and fields.get("expected") == "0":
            recent = exits[name]
            recent.append(now)
            while recent and recent[0] < now - window:
                recent.popleft()
            _record(path, {"name": name, "time": now, "event": "exited", "pid": fields.get("pid"),
                           "from": fields.get("from_state")})
            if len(recent) >= limit:
                _stop(name)
                _record(path, {"name": name, "time": now, "event": "failed",
                               "reason": f"exited unexpectedly {len(recent)} times within "
                                         f"{window:g} s; stopped"})
                recent.clear()
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    main()
