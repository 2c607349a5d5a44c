"""How a service gets its secrets: a Keycloak token (client credentials) → Vault JWT login →
read its own path. A Vault token about to expire, or refused, means a fresh login.

Settings come from the environment (opsctl or the helm chart sets them):
OIDC_TOKEN_URL, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, VAULT_ADDR, VAULT_ROLE (default: the
client id), VAULT_JWT_PATH (default jwt), VAULT_KV_MOUNT (default secret), VAULT_SECRET_PATH
(default: the client id).
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import hvac

RENEW_BEFORE = 30  # seconds: log in again this long before the Vault token expires


class SecretsError(RuntimeError):
    pass


class KeycloakToken:
    """Client-credentials tokens for this service."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, timeout: float = 5):
        self.token_url, self.client_id = token_url, client_id
        self._secret, self._timeout = client_secret, timeout

    def __call__(self) -> str:
        response = httpx.post(self.token_url, timeout=self._timeout, data={
            "grant_type": "client_credentials", "client_id": self.client_id,
            "client_secret": self._secret})
        if response.status_code != 200:
            raise SecretsError(f"Keycloak refused a token for {self.client_id}: "
                               f"{response.status_code} {response.text[:200]}")
        return response.json()["access_token"]


class VaultSecrets:
    def __init__(self, vault_addr: str, role: str, token_provider, path: str,
                 jwt_path: str = "jwt", kv_mount: str = "secret", clock=time.monotonic):
        self.client = hvac.Client(url=vault_addr, timeout=5)
        self.role, self.path, self.jwt_path, self.kv_mount = role, path, jwt_path, kv_mount
        self._token_provider = token_provider
        self._clock = clock
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.logins = 0

    @classmethod
    def from_env(cls) -> "VaultSecrets":
        from order_services.settings import Env

        Env().require("OIDC_TOKEN_URL", "OIDC_CLIENT_ID", "OIDC_CLIENT_SECRET", "VAULT_ADDR")
        env = os.environ
        client_id = env["OIDC_CLIENT_ID"]
        return cls(env["VAULT_ADDR"], env.get("VAULT_ROLE", client_id),
                   KeycloakToken(env["OIDC_TOKEN_URL"], client_id, env["OIDC_CLIENT_SECRET"]),
                   env.get("VAULT_SECRET_PATH", client_id), env.get("VAULT_JWT_PATH", "jwt"),
                   env.get("VAULT_KV_MOUNT", "secret"))

    def _login(self) -> None:
        answer = self.client.auth.jwt.jwt_login(role=self.role, jwt=self._token_provider(),
                                                path=self.jwt_path)
        self.client.token = answer["auth"]["client_token"]
        self._expires_at = self._clock() + answer["auth"]["lease_duration"] - RENEW_BEFORE
        self.logins += 1

    def _read(self) -> dict:
        return self.client.secrets.kv.v2.read_secret_version(
            path=self.path, mount_point=self.kv_mount, raise_on_deleted_version=True)["data"]["data"]

    def read(self) -> dict:
        """This service's secrets; logs in first when the Vault token is (nearly) expired."""
        with self._lock:
            if self._clock() >= self._expires_at:
                self._login()
            try:
                return self._read()
            except hvac.exceptions.Forbidden:
                self._login()  # revoked or expired early: one fresh login, then give up
                return self._read()
