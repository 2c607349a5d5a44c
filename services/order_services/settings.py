"""Settings from environment variables: the one parser every service uses (docs/ORDER_FLOW.md
lists the variables). Every missing variable is named at once, a bad value names its
variable and what it must be; both are a ConfigError, which a service reports on one line
and exits 2 for, without retrying."""

from __future__ import annotations

import os
from typing import Mapping


class ConfigError(Exception):
    """A setting is missing or wrong: the process exits with a message, it does not retry."""


class Env:
    def __init__(self, environ: Mapping[str, str] | None = None):
        self.environ = os.environ if environ is None else environ

    def require(self, *names: str) -> dict[str, str]:
        """The values of `names`, all of them set and non-empty."""
        missing = [n for n in names if not self.environ.get(n)]
        if missing:
            raise ConfigError(f"missing environment variable(s): {', '.join(missing)} "
                              "(see docs/ORDER_FLOW.md)")
        return {n: self.environ[n] for n in names}

    def text(self, name: str, default: str | None = None) -> str | None:
        return self.environ.get(name) or default

    def number(self, name: str, low: int = 1, high: int | None = None, default: int | None = None) -> int:
        """A whole number from low to high (no upper bound if None)."""
        raw = self.environ.get(name) or (None if default is None else str(default))
        if raw is None:
            raise ConfigError(f"missing environment variable: {name}")
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        if not raw.strip().isdigit() or int(raw) < low or (high is not None and int(raw) > high):
            raise ConfigError(f"{name} must be a whole number {bounds}, not {raw!r}")
        return int(raw)

    def port(self, name: str) -> int:
        return self.number(name, 1, 65535)

    def seconds(self, name: str, default: float) -> float:
        raw = self.environ.get(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise ConfigError(f"{name} must be a number of seconds above 0, not {raw!r}")
        return value

    def names(self, name: str, default: str = "") -> frozenset[str]:
        """A comma-separated list."""
        return frozenset(n.strip() for n in (self.environ.get(name, default)).split(",") if n.strip())
