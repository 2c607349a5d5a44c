"""The local target's processes: each one a program of the state folder's supervisord
(opsctl.targets.local.supervisor), which restarts it when it exits unexpectedly.

Each server has a folder `.opsctl/local/<component>/` with its logs and data, and a record
of how it was started (`<name>.run.json`: the configuration fingerprint, the command, when).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from opsctl.errors import Interrupted, OpsError
from opsctl.files import read_json, write_json_atomic
from opsctl.host import chown_tree
from opsctl.targets.local import supervisor, watch


class Process:
    """One supervised process, known to supervisord by its name."""

    def __init__(self, name: str, home: Path):
        self.name = name
        self.home = home
        self.supervisor = supervisor.for_home(home)
        self.record_file = home / f"{name}.run.json"
        self.logfile = home / "logs" / f"{name}.log"

    def record(self) -> dict:
        return read_json(self.record_file, default={}) or {}

    def pid(self) -> int | None:
        info = self.supervisor.info(self.name)
        if not info or info["statename"] not in supervisor.RUNNING_STATES:
            return None
        return info["pid"] or None

    def running(self) -> bool:
        return self.pid() is not None

    @property
    def fingerprint(self) -> str | None:
        return self.record().get("fingerprint")

    def start(self, argv: list[str], env: dict[str, str], fingerprint: str,
              user: str | None = None, cwd: Path | None = None,
              stop_signal: int = signal.SIGTERM, stop_timeout: float = 60, stop_group: bool = True,
              launch: str = "") -> int:
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        chown_tree(self.logfile.parent, user)
        with open(self.logfile, "ab") as log:
            log.write(f"\n--- opsctl start {time.strftime('%Y-%m-%dT%H:%M:%S')}: "
                      f"{' '.join(argv)}\n".encode())
        full_env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", **env}
        started_at = time.time()
        pid = self.supervisor.start(self.name, argv, full_env, self.logfile, cwd or self.home, user,
                                    signal.Signals(stop_signal).name.removeprefix("SIG"), stop_timeout,
                                    stop_group)
        write_json_atomic(self.record_file, {"fingerprint": fingerprint, "launch": launch, "argv": argv,
                                             "started_at": started_at}, mode=0o600)
        return pid

    @property
    def launch(self) -> str | None:
        """The fingerprint of its command and environment alone (not its files)."""
        return self.record().get("launch")

    def reload(self, sig: int, fingerprint: str) -> None:
        """Tell the running process to reread its files (which changed: `fingerprint`)."""
        pid = self.pid()
        if pid is None:
            raise OpsError(f"{self.name} is not running: it cannot reload", "start it again")
        os.kill(pid, sig)
        write_json_atomic(self.record_file, {**self.record(), "fingerprint": fingerprint,
                                             "reloaded_at": time.time()}, mode=0o600)

    def wait_ready(self, probe: Callable[[], bool], timeout: float, cancel) -> None:
        deadline = time.monotonic() + timeout
        first = self.pid()
        while True:
            if cancel.is_set():
                raise Interrupted()
            if probe():
                return
            now = self.pid()
            if now is None or now != first:  # it exited; supervisord may be restarting it: stop that
                self.stop()
                raise OpsError(f"{self.name} exited during start-up:\n{self.log_tail()}",
                               f"read the whole log: {self.logfile}")
            if time.monotonic() > deadline:
                raise OpsError(f"{self.name} was not ready after {timeout:.0f}s:\n{self.log_tail()}",
                               f"read the whole log: {self.logfile}")
            time.sleep(0.25)

    def supervision(self) -> dict:
        """What the supervisor knows: state (running, starting, restarting, failed, stopped),
        restarts since opsctl started it, and the last error with the log's last lines."""
        info = self.supervisor.info(self.name)
        since = self.record().get("started_at", 0)
        events = self.supervisor.exits_since(self.name, since)
        restarts = sum(1 for e in events if e["event"] == "exited")
        failures = [e for e in events if e["event"] == "failed"]
        state = (info or {}).get("statename", "STOPPED")
        if state in supervisor.FAILED_STATES or (failures and state not in supervisor.RUNNING_STATES):
            shown = "failed" if state != "BACKOFF" else "restarting"
        else:
            shown = {"RUNNING": "running", "STARTING": "starting"}.get(state, "stopped")
        last_error = ""
        if failures and shown == "failed":
            last_error = failures[-1]["reason"]
        elif state == "FATAL":  # the watcher records it a moment later: the same words now
            last_error = watch.GAVE_UP.format(retries=supervisor.START_RETRIES)
        elif info and info.get("spawnerr"):
            last_error = info["spawnerr"]
        elif events and events[-1]["event"] == "exited":
            last_error = f"exited unexpectedly at {time.strftime('%H:%M:%S', time.localtime(events[-1]['time']))}"
        return {"state": shown, "restarts": restarts, "last_error": last_error,
                "log_tail": self.log_tail(10) if shown in ("failed", "restarting") else ""}

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace").rstrip().splitlines()[-lines:]
        except OSError:
            return "  (no log)"
        return "\n".join("  | " + line for line in text)

    def stop(self, sig: int | None = None, timeout: float | None = None) -> bool:
        """Stop it with the signal and grace period it was started with, then SIGKILL to the
        whole group; supervisord does not restart a process it was told to stop. True if
        something was running."""
        return self.supervisor.stop(self.name)
