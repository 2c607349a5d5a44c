#!/usr/bin/env bash
# Times what the README's test command sets up on a fresh machine, on a fresh clone of this
# repository with an empty Maven repository, no pip cache and empty Go module and build
# caches, so every Python package, Maven artifact and Go module is downloaded and every Go
# program (Consul; the Kubernetes control plane, etcd, kwok and helm) built again:
# scripts/setup, then the control plane's build (scripts/test's second step).
# (Debian packages stay installed: apt's own time is reported from its history log.)
# Usage: scripts/bench/setup.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
export MAVEN_OPTS="-Dmaven.repo.local=$work/m2"
export PIP_NO_CACHE_DIR=1 GOCACHE="$work/go-build" GOMODCACHE="$work/go-mod"
SECONDS=0
"$work/clone/scripts/setup" >"$work/setup.log" 2>&1 || { cat "$work/setup.log"; exit 1; }
setup=$SECONDS
(cd "$work/clone" && .venv/bin/python -m tests.integration.controlplane build) >"$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
echo "scripts/setup on a fresh clone (empty Maven, pip and Go caches): ${setup} s"
echo "then the control plane, etcd, kwok and helm built from their Go modules: $((SECONDS - setup)) s"
echo "in all: ${SECONDS} s"
chmod -R u+w "$work" 2>/dev/null || true  # Go's module cache is read-only
