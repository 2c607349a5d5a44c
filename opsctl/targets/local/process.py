"""Supervision of the real local servers: start detached, track, probe, stop.

Each server has a folder `.opsctl/local/<component>/` with its pid file, logs and data.
The pid file records the process start time too, so a recycled pid is never mistaken
for our server.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from opsctl.errors import OpsError
from opsctl.files import read_json, write_json_atomic


class Interrupted(Exception):
    """The run was cancelled (Ctrl-C) while this step waited."""


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counts from after the command name, which may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    # A zombie child of ours counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_binary(name: str, install: str) -> str:
    path = shutil.which(name)
    if not path:
        raise OpsError(f"{name} is not installed", f"install it with: {install} (or run scripts/setup)")
    return path


def system_user(name: str | None) -> str | None:
    """The user a server must run as: `name` when we are root (some servers refuse root)."""
    if name is None or os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise OpsError(f"system user '{name}' does not exist",
                       "run scripts/setup (it installs the packages that create it)")
    return name


def chown_tree(path: Path, user: str | None) -> None:
    if not user:
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


class Process:
    """One supervised server process, known by its pid file."""

    def __init__(self, name: str, home: Path):
        self.name = name
        self.home = home
        self.pidfile = home / f"{name}.pid.json"
        self.logfile = home / "logs" / f"{name}.log"

    def record(self) -> dict:
        return read_json(self.pidfile, default={}) or {}

    def pid(self) -> int | None:
        rec = self.record()
        pid = rec.get("pid")
        if not pid or not _alive(pid) or _start_time(pid) != rec.get("start_time"):
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    @property
    def fingerprint(self) -> str | None:
        return self.record().get("fingerprint")

    def start(self, argv: list[str], env: dict[str, str], fingerprint: str,
              user: str | None = None, cwd: Path | None = None) -> int:
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        chown_tree(self.logfile.parent, user)
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env}
        with open(self.logfile, "ab") as log:
            log.write(f"\n--- opsctl start {time.strftime('%Y-%m-%dT%H:%M:%S')}: "
                      f"{' '.join(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=full_env, cwd=cwd or self.home, start_new_session=True,
                    user=user, group=pwd.getpwnam(user).pw_gid if user else None,
                )
            except OSError as e:
                raise OpsError(f"cannot start {self.name}: {argv[0]}: {e.strerror}",
                               "run scripts/setup to install it")
        write_json_atomic(self.pidfile, {"pid": proc.pid, "start_time": _start_time(proc.pid),
                                         "fingerprint": fingerprint, "argv": argv})
        return proc.pid

    def wait_ready(self, probe: Callable[[], bool], timeout: float, cancel) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if cancel.is_set():
                raise Interrupted()
            if probe():
                return
            if not self.running():
                raise OpsError(f"{self.name} exited during start-up:\n{self.log_tail()}",
                               f"read the whole log: {self.logfile}")
            if time.monotonic() > deadline:
                raise OpsError(f"{self.name} was not ready after {timeout:.0f}s:\n{self.log_tail()}",
                               f"read the whole log: {self.logfile}")
            time.sleep(0.25)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace").rstrip().splitlines()[-lines:]
        except OSError:
            return "  (no log)"
        return "\n".join("  | " + line for line in text)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> bool:
        """Signal, wait, then SIGKILL the whole group. True if something was running."""
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(pid)
        self.pidfile.unlink(missing_ok=True)
        return True

    @staticmethod
    def _reap(pid: int) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
