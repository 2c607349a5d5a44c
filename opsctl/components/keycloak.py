"""Keycloak (org.keycloak:keycloak-quarkus-dist from Maven Central) in production mode.

The distribution is unpacked once into the cache and built once (`kc.sh build`), which
makes every later start take seconds instead of a minute; its data (an H2 file
database) lives in the component folder, never inside the distribution.
"""

from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

from opsctl import httpclient
from opsctl.components.base import Release, Server, fingerprint
from opsctl.errors import OpsError
from opsctl import artifacts
from opsctl.host import require_binary

# Build-time options: baked into the distribution by `kc.sh build`.
ADMIN_USER = "opsctl-admin"  # opsctl's admin of the master realm
BUILD_OPTIONS = ["--db=dev-file", "--health-enabled=true", "--metrics-enabled=true"]


class Keycloak(Server):
    ready_timeout = 180.0

    @property
    def dist(self) -> Path:
        return self.ctx.cache_dir / f"keycloak-{self.spec.version}"

    def check_installed(self) -> None:
        require_binary("java", "apt-get install -y openjdk-17-jre-headless")
        if self.ctx.dry_run:
            return
        artifacts.unzipped(f"{self.spec.artifact}:{self.spec.version}", self.dist)
        self._build()

    def _build(self) -> None:
        """`kc.sh build` once per distribution and set of build options."""
        marker = self.dist / ".opsctl-build"
        wanted = fingerprint(BUILD_OPTIONS)
        with open(self.dist / ".opsctl-build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if marker.exists() and marker.read_text() == wanted:
                return
            result = subprocess.run([str(self.dist / "bin" / "kc.sh"), "build", *BUILD_OPTIONS],
                                    capture_output=True, text=True, env=self._java_env())
            if result.returncode != 0:
                tail = "\n".join(result.stdout.strip().splitlines()[-10:])
                raise OpsError(f"kc.sh build failed:\n{tail}\n{result.stderr.strip()}")
            marker.write_text(wanted)

    def _java_env(self) -> dict[str, str]:
        heap = self.spec.memory or "768m"
        return {"JAVA_OPTS_KC_HEAP": f"-Xms64m -Xmx{heap}"}

    def admin_credentials(self) -> tuple[str, str]:
        return ADMIN_USER, self.ctx.secret("keycloak", "admin_password")

    def release(self) -> Release:
        """On the kubernetes target: the official image on its platform.yaml ports, opsctl's
        admin user made on first boot with a password generated into the release's Secret;
        reachable from every bundled service (their tokens) and the edge (people's tokens)."""
        http, management = self.port("http"), self.port("management")
        return Release("data-service", {
            "image": self.spec.image, "ports": {"http": http, "management": management},
            "dataPath": "/opt/keycloak/data",
            # As here, a fixed hostname: one issuer for the services, Vault and people alike
            # (the edge passes people's Host header on, which must not name the issuer).
            "args": ["start", "--http-enabled=true", f"--http-port={http}", f"--http-management-port={management}",
                     f"--hostname={self.endpoint()}", "--health-enabled=true", "--metrics-enabled=true",
                     "--cache=local", "--db=dev-file"],
            "env": {"KC_BOOTSTRAP_ADMIN_USERNAME": ADMIN_USER},
            "secretEnv": {"KC_BOOTSTRAP_ADMIN_PASSWORD": "password"},
            "podSecurityContext": {"fsGroup": 1000},
            "allowFrom": sorted(self.ctx.spec.services),
            "allowNamespaces": [self.ctx.spec.kubernetes.namespace("nginx")]},
            secrets=["password"])

    def env(self) -> dict[str, str]:
        user, password = self.admin_credentials()
        return {
            **self._java_env(),
            # Used only when the master realm is first created.
            "KC_BOOTSTRAP_ADMIN_USERNAME": user,
            "KC_BOOTSTRAP_ADMIN_PASSWORD": password,
            "KC_DB_URL_PATH": str(self.path("data")),
        }

    def argv(self) -> list[str]:
        return [
            str(self.dist / "bin" / "kc.sh"), "start", "--optimized",
            # A fixed hostname keeps the tokens' issuer the same however Keycloak is reached.
            "--http-enabled=true", f"--hostname={self.endpoint()}", "--cache=local",
            f"--http-host={self.ctx.host}", f"--http-port={self.port('http')}",
            f"--http-management-port={self.port('management')}", "--shutdown-delay=0s",
            f"-Dquarkus.transaction-manager.object-store.directory={self.path('data', 'transaction-logs')}",
        ]

    def endpoint(self) -> str:
        return self.address("http").url()

    def probe(self) -> bool:
        url = self.address("management").url("/health/ready")
        return httpclient.answers(url, timeout=1)

    def version(self) -> str:
        text = (self.dist / "version.txt").read_text()
        return text.rsplit("Version", 1)[-1].strip()
