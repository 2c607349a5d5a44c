"""Redis (Debian package): the order cache and the JWKS cache."""

from __future__ import annotations

from opsctl.components.base import LocalServer
from opsctl.targets.local.process import port_open, require_binary


class Redis(LocalServer):
    def check_installed(self) -> None:
        require_binary("redis-server", "apt-get install -y redis-server")

    def config_files(self) -> dict[str, str]:
        password = self.ctx.secret("redis", "password")
        return {"redis.conf": "\n".join([
            f"bind {self.ctx.host}",
            f"port {self.port('redis')}",
            "protected-mode yes",
            "daemonize no",
            f"dir {self.path('data')}",
            f"requirepass {password}",
            "save 900 1",
            "appendonly yes",
            "",
        ])}

    def initialise(self) -> None:
        self.path("data").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        return ["redis-server", str(self.path("redis.conf"))]

    def _client(self):
        import redis

        return redis.Redis(host=self.ctx.host, port=self.port("redis"),
                           password=self.ctx.secret("redis", "password"),
                           socket_timeout=1, socket_connect_timeout=1)

    def probe(self) -> bool:
        if not port_open(self.ctx.host, self.port("redis")):
            return False
        try:
            return bool(self._client().ping())
        except Exception:
            return False

    def version(self) -> str:
        return self._client().info("server")["redis_version"]
