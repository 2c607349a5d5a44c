"""The build of the bundled services each colour runs (opsctl bluegreen deploy).

A colour without a build of its own runs the services installed with opsctl (the working
tree). A deploy puts a build into the colour's own virtual environment under
.opsctl/builds/<colour>/: the services' package from a git ref (`git archive`) or from the
working tree as it is, installed over the main environment's packages, which the colour's
environment sees through a .pth file, so PyTorch, pyspark and the rest are not fetched again
(a dependency the build changes is installed into the colour's own environment).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from opsctl.context import Context
from opsctl.errors import OpsError, UsageError
from opsctl.files import read_json, write_json_atomic


def _home(ctx: Context, colour: str) -> Path:
    return ctx.state_dir / "builds" / colour


def record(ctx: Context, colour: str) -> dict | None:
    """What was deployed to `colour` (source, ref, commit, when), or None."""
    found = read_json(_home(ctx, colour) / "build.json", default=None)
    return found if isinstance(found, dict) and Path(found.get("python", "")).exists() else None


def python(ctx: Context, colour: str) -> str:
    """The interpreter colour's services run with."""
    built = record(ctx, colour)
    return built["python"] if built else sys.executable


def services_checkout() -> Path:
    """The repository the installed services come from (their working tree)."""
    import importlib.util

    found = importlib.util.find_spec("order_services")
    if not found or not found.origin:
        raise OpsError("the services are not installed", "run scripts/setup")
    return Path(found.origin).resolve().parents[2]


def _git(checkout: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise UsageError(f"git {' '.join(args)} in {checkout} failed: {done.stderr.strip()[:300]}",
                         "give a commit, branch or tag of that repository (git log shows them)")
    return done.stdout


def describe(checkout: Path, ref: str | None) -> str:
    """The commit a build comes from (with -dirty for a working tree with changes)."""
    if not (checkout / ".git").exists():
        return "not a git checkout"
    if ref:
        return _git(checkout, "rev-parse", "--short", f"{ref}^{{commit}}").strip()
    return _git(checkout, "describe", "--always", "--dirty").strip()


def make(ctx: Context, colour: str, source: Path | None, ref: str | None) -> dict:
    """Build `ref` (or the working tree) of `source` (default: the services' repository) into
    colour's environment; returns its record. Nothing of the colour changes until it is done."""
    checkout = (source or services_checkout()).resolve()
    if not (checkout / "services" / "pyproject.toml").exists():
        raise UsageError(f"{checkout} holds no services/pyproject.toml",
                         "give the root of a checkout of this repository")
    commit = describe(checkout, ref)
    home = _home(ctx, colour)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    build = home / f"{time.strftime('%Y%m%d-%H%M%S')}-{commit}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(mode=0o700)
    src = checkout / "services"
    if ref:  # the files of that commit, not of the working tree
        archive = subprocess.run(["git", "-C", str(checkout), "archive", "--format=tar", ref, "services"],
                                 capture_output=True, timeout=120)
        if archive.returncode != 0:
            raise UsageError(f"git archive {ref} in {checkout} failed: {archive.stderr.decode()[:300]}",
                             "give a commit, branch or tag of that repository")
        # Not the archive's modes (tar as root keeps them): the umask's, private to this user.
        subprocess.run(["tar", "-x", "--no-same-permissions", "-C", str(build)], input=archive.stdout,
                       check=True, timeout=120)
        src = build / "services"
    venv = build / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "create the environment")
    import site as main_site

    site = next(venv.glob("lib/python*/site-packages"))
    (site / "opsctl-main-environment.pth").write_text("\n".join(main_site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
          "--no-build-isolation", "--no-input", str(src)], f"install the services of {commit}")
    _private(build)
    # Ready: the colour's record names it at once; the build before it stays (its processes
    # may still run on it until they restart), older ones go.
    previous = record(ctx, colour)
    built = {"colour": colour, "source": str(checkout), "ref": ref or "working tree", "commit": commit,
             "built_at": time.time(), "python": str(venv / "bin" / "python")}
    write_json_atomic(home / "build.json", built, mode=0o600)
    keep = {build.name, Path(previous["python"]).parents[1].name if previous else ""}
    for old in home.iterdir():
        if old.is_dir() and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return built


def _private(folder: Path) -> None:
    """Everything under .opsctl is its owner's: venv copies its activate scripts 0644."""
    import os

    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            if mode & 0o077:
                os.chmod(path, mode & ~0o077)


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise OpsError(f"could not {what}: {(done.stderr or done.stdout).strip()[-800:]}",
                       "fix the build and deploy again; the colour still runs its previous build")
