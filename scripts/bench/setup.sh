#!/usr/bin/env bash
# Times scripts/setup on a fresh clone of this repository with an empty Maven
# repository, so every Python package and Maven artifact is downloaded again.
# (Debian packages stay installed: apt's own time is reported from its history log.)
# Usage: scripts/bench/setup.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
export MAVEN_OPTS="-Dmaven.repo.local=$work/m2"
export PIP_NO_CACHE_DIR=1
SECONDS=0
"$work/clone/scripts/setup" >"$work/setup.log" 2>&1 || { cat "$work/setup.log"; exit 1; }
echo "scripts/setup on a fresh clone, empty Maven repository, no pip cache: ${SECONDS} s"
