"""Redis (Debian package): the order cache and the JWKS cache."""

from __future__ import annotations

import hashlib

from opsctl.components.base import LocalServer
from opsctl.files import write_atomic
from opsctl.targets.local.process import port_open, require_binary


class Redis(LocalServer):
    def check_installed(self) -> None:
        require_binary("redis-server", "apt-get install -y redis-server")

    def config_files(self) -> dict[str, str]:
        return {"redis.conf": "\n".join([
            f"bind {self.ctx.host}",
            f"port {self.port('redis')}",
            "protected-mode yes",
            "daemonize no",
            f"dir {self.path('data')}",
            f"aclfile {self.path('users.acl')}",  # the admin (default) user and service users
            "save 900 1",
            "appendonly yes",
            "",
        ])}

    def initialise(self) -> None:
        self.path("data").mkdir(exist_ok=True)
        acl = self.path("users.acl")
        if not acl.exists():
            digest = hashlib.sha256(self.ctx.secret("redis", "password").encode()).hexdigest()
            write_atomic(acl, f"user default on #{digest} ~* &* +@all\n", mode=0o600)

    def argv(self) -> list[str]:
        return ["redis-server", str(self.path("redis.conf"))]

    def _client(self, user: str | None = None, password: str | None = None):
        import redis

        return redis.Redis(host=self.ctx.host, port=self.port("redis"), username=user,
                           password=password or self.ctx.secret("redis", "password"),
                           socket_timeout=1, socket_connect_timeout=1)

    def probe(self) -> bool:
        if not port_open(self.ctx.host, self.port("redis")):
            return False
        try:
            return bool(self._client().ping())
        except Exception:
            return False

    # --- service users (see components/credentials.py) ----------------------------
    def service_user_ok(self, user: str, password: str) -> bool:
        import redis

        try:
            return bool(self._client(user, password).ping())
        except redis.AuthenticationError:
            return False

    def ensure_service_user(self, user: str, password: str) -> None:
        """An ACL user with everything but administration, saved to the ACL file."""
        admin = self._client()
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", "~*", "&*",
                              "+@all", "-@admin", "-@dangerous")
        admin.execute_command("ACL", "SAVE")

    def version(self) -> str:
        return self._client().info("server")["redis_version"]
