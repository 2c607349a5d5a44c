"""The local target's process supervisor: one supervisord (PyPI `supervisor`) per state
folder, driven over its XML-RPC unix socket.

supervisord starts every process opsctl runs (the servers, the bundled services, the
streaming job), restarts one that exits unexpectedly and outlives the opsctl command that
started it. Restart policy, in supervisord's terms: a process that exits within
START_SECONDS of a start is retried START_RETRIES times with a growing backoff (1, 2, 3… s),
then it is FATAL; one that exits after that is restarted at once, and the watcher
(`opsctl.targets.local.watch`, a supervisord event listener) counts those exits and stops a
process that exits RESTART_LIMIT times within RESTART_WINDOW seconds. Both end as "failed"
in `opsctl status`, with the last lines of the process's log.

Layout, in `<state>/local/supervisor/`: supervisord.conf, the socket (0700), supervisord's
own log, `programs/<name>.ini` (one per process; 0600: a program's environment may hold its
client secret), and events.jsonl, the watcher's record of exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

from opsctl.errors import OpsError
from opsctl.files import write_atomic

START_SECONDS = 3     # a process must stay up this long to count as started
START_RETRIES = 5     # quick exits retried (with backoff) before supervisord gives up: FATAL
RESTART_LIMIT = 5     # later exits: this many within RESTART_WINDOW and the watcher stops it
RESTART_WINDOW = 600  # seconds
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with its NUL

RUNNING_STATES = ("STARTING", "RUNNING")
FAILED_STATES = ("FATAL", "BACKOFF")


def _environment(env: dict[str, str]) -> str:
    """supervisord's `environment=`: KEY="value",… (its reader takes quotes but no escapes, so a
    value is wrapped in the quote it does not hold). Not on the command line: /proc shows that
    to every user, and a program's environment may hold its client secret."""
    pairs = []
    for key, value in env.items():
        quote = '"' if '"' not in value else "'"
        if quote in value or value.startswith(("'", '"')) or value.endswith(("'", '"')):
            raise OpsError(f"the environment variable {key} of a supervised program holds quotes "
                           "supervisord cannot carry")
        pairs.append(f"{key}={quote}{value}{quote}")
    return _ini_value(",".join(pairs))


def _ini_value(text: str) -> str:
    """A value as supervisord's ini reader takes it: no newlines, % doubled (interpolation)."""
    if "\n" in text or "\r" in text:
        raise OpsError(f"a supervised program's setting holds a line break: {text[:60]!r}")
    return text.replace("%", "%%")


class Supervisor:
    """The supervisord of one state folder; started on first use."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "supervisord.conf"
        self.socket = self.root / "supervisor.sock"
        self.programs = self.root / "programs"
        self.events = self.root / "events.jsonl"
        self.log = self.root / "supervisord.log"

    # --- the daemon -------------------------------------------------------------------
    def _proxy(self):
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return self._proxy().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    @contextlib.contextmanager
    def _locked(self):
        """One opsctl at a time changes the programs (install runs steps in threads and
        processes may race): an exclusive lock on a file beside the config."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(os.open(self.root / ".lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _config(self) -> str:
        watcher = shlex.join([sys.executable, "-m", "opsctl.targets.local.watch", str(self.events),
                              str(RESTART_LIMIT), str(RESTART_WINDOW), str(START_RETRIES)])
        return f"""; written by opsctl: the supervisor of the local platform in {self.root.parent.parent}
[unix_http_server]
file={_ini_value(str(self.socket))}
chmod=0700

[supervisord]
logfile={_ini_value(str(self.log))}
logfile_maxbytes=10MB
logfile_backups=2
pidfile={_ini_value(str(self.root / 'supervisord.pid'))}
childlogdir={_ini_value(str(self.root))}
umask=077
identifier=opsctl

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[eventlistener:opsctl-watch]
command={_ini_value(watcher)}
events=PROCESS_STATE_EXITED,PROCESS_STATE_FATAL
autorestart=true
stderr_logfile={_ini_value(str(self.root / 'watch.log'))}

[include]
files = {_ini_value(str(self.programs))}/*.ini
"""

    def ensure(self) -> None:
        """supervisord running for this state folder (started detached if it is not)."""
        if self.answers():
            return
        if len(str(self.socket).encode()) > SOCKET_PATH_MAX:
            raise OpsError(f"the supervisor's socket path is too long for a unix socket: {self.socket}",
                           "run opsctl from a working directory with a shorter path")
        with self._locked():
            if self.answers():
                return
            self.programs.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(self.conf, self._config(), mode=0o600)
            self.socket.unlink(missing_ok=True)
            supervisord = Path(sys.executable).with_name("supervisord")
            if not supervisord.exists():
                raise OpsError("supervisord is not installed in opsctl's environment",
                               "run scripts/setup (it installs the PyPI package supervisor)")
            # supervisord forks into the background itself: it outlives this command.
            # Its environment is what every program inherits: only PATH and the locale, not
            # this command's (a VAULT_TOKEN, say).
            env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
            result = subprocess.run([str(supervisord), "-c", str(self.conf)], capture_output=True,
                                    text=True, stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=env, umask=0o077)
            if result.returncode != 0:
                raise OpsError(f"supervisord did not start: {(result.stderr or result.stdout).strip()[-500:]}",
                               f"read its log: {self.log}")
            deadline = time.monotonic() + 20
            while not self.answers():
                if time.monotonic() > deadline:
                    raise OpsError("supervisord did not answer on its socket within 20 s",
                                   f"read its log: {self.log}")
                time.sleep(0.1)

    def shutdown(self) -> bool:
        """Stop supervisord (and whatever it still runs). True if it was running."""
        if not self.answers():
            return False
        pid_file = self.root / "supervisord.pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        try:
            self._proxy().shutdown()
        except (OSError, xmlrpc.client.Error):
            pass
        deadline = time.monotonic() + 60
        while pid and time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        return True

    # --- programs ---------------------------------------------------------------------
    def info(self, name: str) -> dict | None:
        """supervisord's view of program `name`, or None (no supervisord, no such program)."""
        if not self.socket.exists():
            return None
        try:
            return self._proxy().getProcessInfo(name)
        except (OSError, xmlrpc.client.Error):
            return None

    def start(self, name: str, argv: list[str], env: dict[str, str], logfile: Path, cwd: Path,
              user: str | None, stop_signal: str, stop_seconds: float, stop_group: bool = True) -> int:
        """(Re)define program `name` and start it; its pid, or 0 when it already exited (the
        caller's readiness wait reports that, with the log). Without `stop_group` the stop
        signal goes to the leader only; the rest of its group is killed after `stop_seconds`."""
        self.ensure()
        lines = [f"[program:{name}]",
                 f"command={_ini_value(shlex.join(argv))}",
                 f"environment={_environment(env)}",
                 f"directory={_ini_value(str(cwd))}",
                 "autostart=false",
                 "autorestart=unexpected",
                 "exitcodes=0",
                 f"startsecs={START_SECONDS}",
                 f"startretries={START_RETRIES}",
                 f"stopsignal={stop_signal}",
                 f"stopwaitsecs={int(stop_seconds)}",
                 f"stopasgroup={str(stop_group).lower()}",
                 "killasgroup=true",
                 "umask=077",
                 "redirect_stderr=true",
                 f"stdout_logfile={_ini_value(str(logfile))}",
                 "stdout_logfile_maxbytes=50MB",
                 "stdout_logfile_backups=2"]
        if user:
            lines.append(f"user={user}")
        with self._locked():
            write_atomic(self.programs / f"{name}.ini", "\n".join(lines) + "\n", mode=0o600)
            proxy = self._proxy()
            try:
                proxy.reloadConfig()
                with contextlib.suppress(xmlrpc.client.Fault):  # a redefined program: drop the old
                    proxy.stopProcess(name, True)
                with contextlib.suppress(xmlrpc.client.Fault):
                    proxy.removeProcessGroup(name)
                proxy.addProcessGroup(name)
                proxy.startProcess(name, False)
            except xmlrpc.client.Fault as fault:
                # A program that died at once may be reaped inside startProcess already, which
                # then answers SPAWN_ERROR: the wait below reports that one, with its log.
                died = (self.info(name) or {}).get("spawnerr", "").startswith("Exited too quickly")
                if not (fault.faultString.startswith("SPAWN_ERROR") and died):
                    raise OpsError(f"supervisord could not start {name}: {fault.faultString}",
                                   f"read its log: {self.log}") from None
        deadline = time.monotonic() + 10
        while True:
            info = self.info(name) or {}
            if info.get("pid"):
                return info["pid"]
            spawnerr = info.get("spawnerr") or ""
            # supervisord also says "Exited too quickly" when it gave up on a program that ran
            # and died at once (FATAL): the caller reports that one, with the log.
            if spawnerr and not spawnerr.startswith("Exited too quickly"):  # the command could not be run
                self.stop(name)
                raise OpsError(f"cannot start {name}: {argv[0]}: {spawnerr}", "run scripts/setup to install it")
            if info.get("statename") in ("FATAL", "BACKOFF", "EXITED"):
                return 0
            if time.monotonic() > deadline:
                raise OpsError(f"supervisord did not start {name} within 10 s",
                               f"read its log: {self.log}")
            time.sleep(0.05)

    def stop(self, name: str) -> bool:
        """Stop program `name` (its stop signal, then SIGKILL to the group); one already being
        stopped (by the watcher) is waited for, so that its ports are free after. True if it ran."""
        info = self.info(name)
        if info is not None and info["statename"] == "STOPPING":
            while (self.info(name) or {}).get("statename") == "STOPPING":
                time.sleep(0.1)  # supervisord's stopwaitsecs bounds this, then SIGKILL
            return True
        if info is None or info["statename"] not in (*RUNNING_STATES, "BACKOFF"):
            return False
        try:
            self._proxy().stopProcess(name, True)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise OpsError(f"supervisord could not stop {name}: {fault.faultString}") from None
        return True

    def exits_since(self, name: str, since: float) -> list[dict]:
        """The watcher's records of program `name` ending since `since` (epoch seconds)."""
        try:
            lines = self.events.read_text().splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("name") == name and event.get("time", 0) >= since:
                    found.append(event)
        return found


def for_home(home: Path) -> Supervisor:
    """The supervisor of the state folder a component's home (`<state>/local/<name>`) is in."""
    return Supervisor(Path(home).parent / "supervisor")


def shutdown_all(state_dir: Path) -> bool:
    return Supervisor(Path(state_dir) / "local" / "supervisor").shutdown()

