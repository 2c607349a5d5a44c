"""What the background workers (the consumers, the CDC bridge) share: their error kinds,
waits between retries, and the metrics endpoint that doubles as readiness."""

from __future__ import annotations


class ConfigError(Exception):
    """A setting is missing or wrong: the process exits with a message, it does not retry."""


class Unavailable(Exception):
    """A server the worker needs cannot be reached: wait, then try again."""


class Stopping(Exception):
    """SIGTERM arrived while waiting: leave the work in hand unacknowledged."""


class Backoff:
    """Exponential waits: first, 2×first, … up to cap; reset() after a success."""

    def __init__(self, first: float, cap: float):
        self.first, self.cap, self.failures = first, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2 ** self.failures))
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


def serve_metrics(port: int) -> None:
    """Prometheus metrics on 127.0.0.1:port (opsctl waits for it as readiness)."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr="127.0.0.1")
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on 127.0.0.1:{port}: {e}") from None
