#!/usr/bin/env python3
"""Runs a benchmark script of an earlier revision with this checkout's installed packages,
so that a comparison shows what the code changed, not what the dependencies did.

The revision's tree is checked out in a temporary folder (git worktree) and run through a
throw-away virtual environment whose path puts that tree (opsctl and the services) before
this environment's packages; the servers come from the same cache (OPSCTL_CACHE_DIR).
Prints the script's output.

Usage: .venv/bin/python scripts/bench/baseline.py REV scripts/bench/SCRIPT.py [ARGS...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.integration.conftest import cache_dir  # noqa: E402


def run_at(rev: str, script: str, *args: str) -> str:
    folder = Path(tempfile.mkdtemp(prefix="opsctl-baseline-"))
    folder.chmod(0o755)  # the servers' system users pass through it to their data folders
    tree, env = folder / "tree", folder / "venv"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    try:
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", "--symlinks", str(env)], check=True)
        site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
        # That tree first, then this environment's packages (their editable finders come after).
        (site / "baseline.pth").write_text(f"{tree}\n{tree / 'services'}\n"
                                           f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
        (env / "bin" / "supervisord").symlink_to(Path(sys.executable).with_name("supervisord"))
        opsctl = env / "bin" / "opsctl"
        opsctl.write_text(f"#!{env / 'bin' / 'python'}\nfrom opsctl.cli import main\nmain()\n")
        opsctl.chmod(0o755)
        result = subprocess.run([str(env / "bin" / "python"), str(tree / script), *args], cwd=tree,
                                env={**os.environ, "OPSCTL_CACHE_DIR": cache_dir()},
                                capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{script} at {rev} failed ({result.returncode}):\n{result.stdout}{result.stderr[-3000:]}")
        return result.stdout
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(run_at(sys.argv[1], sys.argv[2], *sys.argv[3:]), end="")
