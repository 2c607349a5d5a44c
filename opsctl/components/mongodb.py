"""The MongoDB store, served locally by SecantusDB (PyPI `secantusdb`).

A real mongod cannot be installed from the package registries this project may use;
SecantusDB speaks the MongoDB wire protocol to pymongo, including the replica set
`rs0` and change streams that the CDC bridge needs.

Authentication is required: opsctl is the admin (`opsctl-admin`, root on admin, its
password generated into secrets.json); each service logs in as its own user on the
platform's database with only the actions it needs (SecantusDB grants privileges per
database, not per collection).
"""

from __future__ import annotations

import sys

from opsctl.components.base import Release, Server
from opsctl.errors import OpsError
from opsctl.net import port_open

ADMIN_USER = "opsctl-admin"

# What a service does in the platform's database (custom roles, created by opsctl), by
# its spec's `role`: the consumers and the screening job upsert orders (and its dead
# letters); the CDC bridge reads and watches the change stream.
ROLES = {
    "writer": ("order-writer", ["find", "insert", "update", "killCursors"]),
    "reader": ("order-reader", ["find", "changeStream", "killCursors"]),
}
RECENT_ORDERS_INDEX = "customer_recent_orders"
NOT_YET_INITIALIZED = 94  # mongod's error code: started with --replSet, never initiated


class MongoDB(Server):
    converges_on_cluster = True  # on a cluster too: the set initiated, the index made
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
                "--replset", self.ctx.spec.names.mongodb.replica_set, "--admin-user", ADMIN_USER]

    def release(self) -> Release:
        """On the kubernetes target: the official MongoDB image as the replica set of
        platform.yaml (authenticated: members share a key file, opsctl's admin user is made on
        first boot), both generated into the release's Secret; reachable only from the
        services whose credentials name MongoDB."""
        port = self.port("mongo")
        return Release("data-service", {
            "image": self.spec.image, "ports": {"mongo": port}, "dataPath": "/data/db",
            "args": ["--replSet", self.ctx.spec.names.mongodb.replica_set, "--bind_ip_all", "--port", str(port),
                     "--keyFile", "/etc/opsctl-credentials/keyfile"],
            "env": {"MONGO_INITDB_ROOT_USERNAME": ADMIN_USER},
            "secretEnv": {"MONGO_INITDB_ROOT_PASSWORD": "password"}, "secretFiles": ["keyfile"],
            "podSecurityContext": {"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999},
            "allowFrom": self.users()},
            secrets=["password", "keyfile"])

    def env(self) -> dict[str, str]:
        return {"SECANTUS_ADMIN_PASSWORD": self.ctx.secret("mongodb", "admin_password")}

    def endpoint(self) -> str:
        return self.address("mongo").url(scheme="mongodb")

    def client(self, user: str | None = None, password: str | None = None):
        """A client as `user` (a service user, on the platform's database), else as the admin."""
        from pymongo import MongoClient

        names = self.ctx.spec.names.mongodb
        if user is None:
            user, password, source = ADMIN_USER, self.ctx.secret("mongodb", "admin_password"), "admin"
        else:
            source = names.database
        where = self.ctx.reach(self.name, "mongo").url(scheme="mongodb")
        # Direct: the set's one member, even where it names itself by a name only the
        # cluster resolves (opsctl reaches it through a port-forward there).
        return MongoClient(f"{where}/?replicaSet={names.replica_set}", directConnection=True, username=user,
                           password=password, authSource=source,
                           serverSelectionTimeoutMS=1500, connectTimeoutMS=1000)

    # --- service users (see components/credentials.py) ----------------------------
    def _role(self, service: str | None) -> tuple[str, list[str]]:
        wiring = self.ctx.spec.services.get(service) if service else None
        return ROLES[wiring.role if wiring and wiring.role in ROLES else "writer"]

    def service_user_ok(self, user: str, password: str, service: str | None = None) -> bool:
        """The password works and the user holds exactly its service's role, as it should."""
        from pymongo.errors import OperationFailure

        database = self.ctx.spec.names.mongodb.database
        try:
            with self.client(user, password) as client:
                client[database].command("ping")
        except OperationFailure:
            return False
        role, actions = self._role(service)
        with self.client() as client:
            db = client[database]
            users = db.command("usersInfo", user)["users"]
            found = db.command("rolesInfo", role, showPrivileges=True)["roles"]
        granted = [{"role": r["role"], "db": r["db"]} for r in users[0]["roles"]] if users else []
        have = sorted(a for p in (found[0].get("privileges") or []) for a in p["actions"]) if found else []
        return granted == [{"role": role, "db": database}] and have == sorted(actions)

    def ensure_service_user(self, user: str, password: str, service: str | None = None) -> None:
        database = self.ctx.spec.names.mongodb.database
        role, actions = self._role(service)
        privileges = [{"resource": {"db": database, "collection": ""}, "actions": actions}]
        with self.client() as client:
            db = client[database]
            verb = "updateRole" if db.command("rolesInfo", role)["roles"] else "createRole"
            db.command(verb, role, privileges=privileges, roles=[])
            verb = "updateUser" if db.command("usersInfo", user)["users"] else "createUser"
            db.command(verb, user, pwd=password, roles=[{"role": role, "db": database}])

    def converge(self) -> str | None:
        """The replica set initiated (a new mongod on a cluster; SecantusDB is one from the
        start), and the index the screening job reads by: a customer's recent orders, in time."""
        names, done = self.ctx.spec.names.mongodb, []
        with self.client() as client:
            if self._initiate(client):
                done.append(f"replica set {names.replica_set} initiated")
            orders = client[names.database][names.orders]
            if RECENT_ORDERS_INDEX not in orders.index_information():
                orders.create_index([("customer.id", 1), ("created_at", 1)], name=RECENT_ORDERS_INDEX)
                done.append(f"index {RECENT_ORDERS_INDEX} created")
        return ", ".join(done) or None

    def _initiate(self, client, timeout: float = 60) -> bool:
        """Initiate the set with this server as its one member, named as the services reach
        it, and wait until it is primary; False if it is a set already."""
        import time

        from pymongo.errors import OperationFailure

        try:
            client.admin.command("replSetGetStatus")
            return False
        except OperationFailure as e:
            if e.code != NOT_YET_INITIALIZED:
                raise
        member = str(self.ctx.address(self.name, "mongo"))
        client.admin.command("replSetInitiate", {"_id": self.ctx.spec.names.mongodb.replica_set,
                                                 "members": [{"_id": 0, "host": member}]})
        deadline = time.monotonic() + timeout
        while not client.admin.command("hello").get("isWritablePrimary"):
            if time.monotonic() > deadline:
                raise OpsError(f"MongoDB did not become the primary of its replica set in {timeout:.0f} s",
                               "see its pod's log, then run install again")
            time.sleep(0.5)
        return True

    def probe(self) -> bool:
        if not port_open(self.address("mongo")):
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
