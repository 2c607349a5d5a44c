"""What the background workers (the consumers, the CDC bridge, the screening stream) share:
their main, their error kinds, waits between retries, and the metrics endpoint that
doubles as readiness."""

from __future__ import annotations

from typing import Callable, Protocol

from order_services.settings import ConfigError


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


def serve_metrics(port: int) -> str:
    """Prometheus metrics on METRICS_HOST (default 127.0.0.1; an image sets 0.0.0.0):port,
    which opsctl waits for as readiness; their URL."""
    import os

    from prometheus_client import start_http_server

    host = os.environ.get("METRICS_HOST") or "127.0.0.1"
    try:
        start_http_server(port, addr=host)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {e}") from None
    return f"http://{host}:{port}/metrics"


class Worker(Protocol):
    def run(self) -> int: ...

    def stop(self, signum=None, frame=None) -> None: ...


def run_worker(default_name: str, start: Callable[[str], "Worker | int"]) -> int:
    """A worker's main, the one lifecycle they share: logs to stdout at LOG_LEVEL, then
    start(its SERVICE_NAME) makes the worker, which runs until SIGTERM or SIGINT stops it
    (the work in hand finished first), its exit code the process's. A start that runs the
    work itself returns the exit code instead (the stream: its handlers wait for Spark). A
    ConfigError is a message on stderr and exit code 2, never a retry."""
    import logging
    import os
    import signal
    import sys

    logging.basicConfig(stream=sys.stdout, level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = os.environ.get("SERVICE_NAME") or default_name
    try:
        worker = start(name)
        if isinstance(worker, int):
            return worker
        signal.signal(signal.SIGTERM, worker.stop)
        signal.signal(signal.SIGINT, worker.stop)
        return worker.run()
    except ConfigError as e:
        print(f"{name}: configuration error: {e}", file=sys.stderr, flush=True)
        logging.getLogger(name).error("configuration error: %s", e)
        return 2
