"""PostgreSQL (Debian package): priority orders and the stock catalogue.

initdb, postgres and pg_ctl refuse to run as root, so as root the server runs as the
`postgres` system user. Its data folder must be reachable by that user: when the
working directory is not (a checkout under /root, say, or a state folder created private,
0700, as opsctl creates it), the data lives in /var/lib/opsctl/postgres-<id> instead
(owned by postgres, 0700), and `down --purge` deletes it there too.
"""

from __future__ import annotations

import hashlib
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from opsctl.components.base import Release, Server
from opsctl.errors import OpsError
from opsctl.files import write_atomic
from opsctl.net import port_open
from opsctl.host import chown_tree


EXTERNAL_DATA = Path("/var/lib/opsctl")


def _bin_dir() -> Path | None:
    """The newest PostgreSQL server installed by Debian."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


def _unreachable_parent(path: Path, user: str) -> Path | None:
    """The first folder above `path` that `user` cannot enter, if any."""
    entry = pwd.getpwnam(user)
    for folder in reversed(path.parents):
        if not folder.exists():
            return folder  # created by us later, private to us (opsctl's umask is 077)
        st = folder.stat()
        bit = 0o100 if st.st_uid == entry.pw_uid else 0o010 if st.st_gid == entry.pw_gid else 0o001
        if not st.st_mode & bit:
            return folder
    return None


class Postgres(Server):
    run_as = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown: SIGTERM would wait for every client to leave

    def start_dir(self) -> Path:
        return self.data  # the postgres user cannot enter the private state folder

    @property
    def bin(self) -> Path:
        found = _bin_dir()
        if not found:
            raise OpsError("PostgreSQL server is not installed",
                           "install it with: apt-get install -y postgresql (or run scripts/setup)")
        return found

    def check_installed(self) -> None:
        self.bin

    @property
    def data(self) -> Path:
        if self.user and _unreachable_parent(self.home, self.user):
            digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
            return EXTERNAL_DATA / f"postgres-{digest}"
        return self.path("data")

    def initialise(self) -> None:
        """initdb once, into a scratch folder renamed when complete."""
        data = self.data
        if (data / "PG_VERSION").exists():
            return
        data.parent.mkdir(parents=True, exist_ok=True)
        if data.parent == EXTERNAL_DATA:  # postgres must enter it; each data folder in it is 0700
            EXTERNAL_DATA.chmod(0o755)
        scratch = data.with_name(data.name + ".initdb")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700, parents=True)
        pwfile = scratch.with_name(scratch.name + ".pw")  # where the postgres user can read it
        write_atomic(pwfile, self.ctx.secret("postgres", "password") + "\n", mode=0o600)
        for path in (scratch, pwfile):
            chown_tree(path, self.user)
        try:
            result = subprocess.run(
                [str(self.bin / "initdb"), "-D", str(scratch), "-U", "postgres",
                 f"--pwfile={pwfile}", "--auth-local=scram-sha-256", "--auth-host=scram-sha-256",
                 "-E", "UTF8", "--locale=C.UTF-8"],
                capture_output=True, text=True, cwd="/", user=self.user,
                group=pwd.getpwnam(self.user).pw_gid if self.user else None,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise OpsError(f"initdb failed:\n{result.stderr.strip()}")
        scratch.rename(data)

    def argv(self) -> list[str]:
        # No unix socket: TCP only, which also avoids the 107-byte socket path limit.
        return [str(self.bin / "postgres"), "-D", str(self.data),
                "-c", f"listen_addresses={self.ctx.host}", "-c", f"port={self.port('postgres')}",
                "-c", "unix_socket_directories=", "-c", "logging_collector=off"]

    def release(self) -> Release:
        """On the kubernetes target: the data-service chart with the official image, the
        superuser `postgres` with a password generated into the release's Secret, the orders
        database created on first start, reachable only from the services that store in it."""
        data = "/var/lib/postgresql/data"
        return Release("data-service", {
            "image": self.spec.image, "ports": {"postgres": self.port("postgres")}, "dataPath": data,
            "args": ["-c", f"port={self.port('postgres')}"],
            "env": {"PGDATA": f"{data}/pgdata", "POSTGRES_DB": self.ctx.spec.names.postgres.database},
            "secretEnv": {"POSTGRES_PASSWORD": "password"},
            "allowFrom": self.users()},
            secrets=["password"])

    def connect(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None,
                autocommit: bool = False):
        import psycopg

        where = self.ctx.reach(self.name, "postgres")
        return psycopg.connect(host=where.host, port=where.port, user=user,
                               password=password or self.ctx.secret("postgres", "password"),
                               dbname=dbname, connect_timeout=2, autocommit=autocommit)

    # --- service users (see components/credentials.py) ----------------------------
    def service_user_ok(self, user: str, password: str, service: str | None = None) -> bool:
        import psycopg

        try:
            with self.connect(self.ctx.spec.names.postgres.database, user, password):
                return True
        except psycopg.OperationalError:
            return False

    def ensure_service_user(self, user: str, password: str, service: str | None = None) -> None:
        """A login role that may use (and create tables in) the platform's database."""
        from psycopg import sql

        database = self.ctx.spec.names.postgres.database
        role, db = sql.Identifier(user), sql.Identifier(database)
        with self.connect(autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database]).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(db))
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [user]).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} WITH LOGIN PASSWORD {}").format(
                role, sql.Literal(password)))
            conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(db, role))
        with self.connect(database, autocommit=True) as conn:
            conn.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(role))

    def probe(self) -> bool:
        if not port_open(self.address("postgres")):
            return False
        try:
            with self.connect():
                return True
        except Exception:
            return False

    def purge(self) -> None:
        if self.data != self.path("data"):
            shutil.rmtree(self.data, ignore_errors=True)
        super().purge()

    def version(self) -> str:
        with self.connect() as conn:
            return conn.execute("SHOW server_version").fetchone()[0].split()[0]
