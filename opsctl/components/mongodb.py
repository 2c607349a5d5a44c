"""The MongoDB store, served locally by SecantusDB (PyPI `secantusdb`).

A real mongod cannot be installed from the package registries this project may use;
SecantusDB speaks the MongoDB wire protocol to pymongo, including the replica set
`rs0` and change streams that the CDC bridge needs.
"""

from __future__ import annotations

import sys

from opsctl.components.base import LocalServer
from opsctl.errors import OpsError
from opsctl.targets.local.process import port_open


class MongoDB(LocalServer):
    def check_installed(self) -> None:
        try:
            import secantus  # noqa: F401  (only checks that it is there)
        except ImportError:
            raise OpsError("the MongoDB-compatible server (secantusdb) is not installed",
                           "install it with: .venv/bin/pip install secantusdb (or run scripts/setup)")

    def initialise(self) -> None:
        self.path("data").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "opsctl.targets.local.secantus_server",
                "--host", self.ctx.host, "--port", str(self.port("mongo")),
                "--storage-path", str(self.path("data")),
                "--replset", self.ctx.spec.names.mongodb.replica_set]

    def endpoint(self) -> str:
        return f"mongodb://{self.ctx.host}:{self.port('mongo')}"

    def client(self, user: str | None = None, password: str | None = None):
        from pymongo import MongoClient

        names = self.ctx.spec.names.mongodb
        return MongoClient(f"{self.endpoint()}/?replicaSet={names.replica_set}", username=user,
                           password=password, authSource=names.database,
                           serverSelectionTimeoutMS=1500, connectTimeoutMS=1000)

    # --- service users (see components/credentials.py) ----------------------------
    def service_user_ok(self, user: str, password: str) -> bool:
        from pymongo.errors import OperationFailure

        try:
            with self.client(user, password) as client:
                client[self.ctx.spec.names.mongodb.database].command("ping")
            return True
        except OperationFailure:
            return False

    def ensure_service_user(self, user: str, password: str) -> None:
        database = self.ctx.spec.names.mongodb.database
        roles = [{"role": "readWrite", "db": database}]
        with self.client() as client:
            db = client[database]
            exists = db.command("usersInfo", user)["users"]
            verb = "updateUser" if exists else "createUser"
            db.command(verb, user, pwd=password, roles=roles)

    def probe(self) -> bool:
        if not port_open(self.ctx.host, self.port("mongo")):
            return False
        try:
            with self.client() as client:
                client.admin.command("ping")
            return True
        except Exception:
            return False

    def version(self) -> str:
        with self.client() as client:
            return client.admin.command("buildInfo")["version"]

    def health_detail(self) -> tuple[bool, str]:
        with self.client() as client:
            hello = client.admin.command("hello")
        wanted = self.ctx.spec.names.mongodb.replica_set
        if hello.get("setName") != wanted:
            return False, f"replica set is {hello.get('setName')!r}, expected {wanted!r}"
        return True, f"replica set {wanted}, primary"
