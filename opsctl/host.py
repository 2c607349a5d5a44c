"""This machine: its installed programs, its system users, file ownership and free ports.
Components ask it what is installed; the local target uses it to run them."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
from pathlib import Path

from opsctl.errors import OpsError


def docker_engine() -> str | None:
    """The docker program when its engine answers; None without one (a docker CLI alone
    builds and runs nothing)."""
    import subprocess

    found = shutil.which("docker")
    if not found:
        return None
    try:
        answer = subprocess.run([found, "version", "--format", "{{.Server.Version}}"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if answer.returncode == 0 else None


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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
