"""Where a component answers, and whether it does: target-neutral network helpers."""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Address:
    """A component's `host:port`, as its clients dial it."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return f"{host}:{self.port}"

    def url(self, path: str = "", scheme: str = "http") -> str:
        return f"{scheme}://{self}{path}"


def port_open(address: Address, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            return True
    except OSError:
        return False
