"""Redis (Debian package): the order cache and the JWKS cache."""

from __future__ import annotations

import hashlib

from opsctl.components.base import Release, Server
from opsctl.files import write_atomic
from opsctl.net import port_open
from opsctl.host import require_binary


class Redis(Server):
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

    def release(self) -> Release:
        """On the kubernetes target: the data-service chart, its admin password generated into
        the release's Secret, reachable only from the services whose credentials name Redis."""
        port = self.port("redis")
        return Release("data-service", {
            "image": self.spec.image, "ports": {"redis": port}, "dataPath": "/data",
            "args": ["redis-server", "--port", str(port), "--dir", "/data", "--appendonly", "yes",
                     "--save", "900 1", "--requirepass", "$(REDIS_PASSWORD)"],
            "secretEnv": {"REDIS_PASSWORD": "password"},
            "allowFrom": self.users()},
            secrets=["password"])

    def _client(self, user: str | None = None, password: str | None = None):
        import redis

        where = self.ctx.reach(self.name, "redis")
        return redis.Redis(host=where.host, port=where.port, username=user,
                           password=password or self.ctx.secret("redis", "password"),
                           socket_timeout=1, socket_connect_timeout=1)

    def probe(self) -> bool:
        if not port_open(self.address("redis")):
            return False
        try:
            return bool(self._client().ping())
        except Exception:
            return False

    # --- service users (see components/credentials.py) ----------------------------
    def acl(self, service: str | None) -> tuple[list[str], list[str]]:
        """(key patterns, commands) a service may use: its spec's `cache` (the order creator
        reads and writes order:<id>, idempotency:<key> and unconfirmed:<id>; a consumer marks
        order:<id> dead-lettered, one SET). Any other service: PING only."""
        wiring = self.ctx.spec.services.get(service) if service else None
        cache = wiring.cache if wiring else None
        if cache is None:
            return [], ["-@all", "+ping"]
        return [f"~{key}:*" for key in cache.keys], ["-@all", *(f"+{c}" for c in cache.commands), "+ping"]

    def service_user_ok(self, user: str, password: str, service: str | None = None) -> bool:
        """The user logs in with this password and holds exactly its service's ACL."""
        import redis

        try:
            if not self._client(user, password).ping():
                return False
        except redis.AuthenticationError:
            return False
        granted = self._client().execute_command("ACL", "GETUSER", user) or {}
        text = lambda key: (granted.get(key) or b"").decode().split()  # noqa: E731
        keys, commands = self.acl(service)
        return (set(text(b"keys")) == set(keys) and set(text(b"commands")) == set(commands)
                and not text(b"channels"))

    def ensure_service_user(self, user: str, password: str, service: str | None = None) -> None:
        """An ACL user with its service's keys and commands (acl), saved to the ACL file."""
        keys, commands = self.acl(service)
        admin = self._client()
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}",
                              "resetchannels", *keys, *commands)
        admin.execute_command("ACL", "SAVE")

    def version(self) -> str:
        return self._client().info("server")["redis_version"]
