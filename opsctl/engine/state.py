"""The state file: what the last run did, written atomically after every step.

A run that fails or is interrupted leaves it consistent; the next run reads it to say
what it resumes, and every step reconciles from what is really there, so nothing that
is done is done again.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from opsctl.errors import OpsError
from opsctl.files import read_json, write_json_atomic


class StateFile:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.data = read_json(path, default={}) or {}

    @property
    def last_run(self) -> dict:
        return self.data.get("run", {})

    def unfinished_run(self) -> dict | None:
        """The previous run, if it failed or was interrupted."""
        run = self.last_run
        return run if run.get("result") in ("failed", "interrupted", "running") else None

    def begin(self, command: str, target: str, steps: list[str]) -> None:
        with self.lock:
            previous = self.data.get("steps", {})
            self.data = {
                "run": {"id": uuid.uuid4().hex[:12], "command": command, "target": target,
                        "started_at": time.time(), "result": "running", "steps": steps},
                "steps": previous,
            }
            self._save()

    def record(self, step: str, result: dict) -> None:
        with self.lock:
            self.data.setdefault("steps", {})[step] = {**result, "at": time.time()}
            self._save()

    def finish(self, result: str) -> None:
        with self.lock:
            self.data["run"].update(result=result, finished_at=time.time())
            self._save()

    def _save(self) -> None:
        write_json_atomic(self.path, self.data)


@contextmanager
def exclusive(lock_path: Path, what: str):
    """One opsctl run at a time per state directory."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another opsctl command"
            raise OpsError(
                f"cannot run {what}: {holder} is running in this directory",
                "wait for it to finish, or stop it, and run again",
            )
        f.seek(0)
        f.truncate()
        f.write(f"opsctl {what} (pid {os.getpid()})")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
