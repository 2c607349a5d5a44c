"""Vault's life: init (shares optionally PGP-encrypted), unseal, a root token when truly
needed, and its seal status, like `vault operator init|unseal|generate-root`."""

from __future__ import annotations

import base64
from typing import Callable, Iterable

from opsctl.app import Result
from opsctl.components import build, vault
from opsctl.context import Context
from opsctl.errors import UNHEALTHY, OpsError, UsageError

SOURCES = ("file", "stdin", "prompt")  # where unseal key shares come from
Prompt = Callable[[str], str]  # asks for one share, hidden


def server(ctx: Context):
    found = build("vault", ctx)
    if not found.probe():
        raise OpsError(f"Vault is not running at {found.addr}", f"run: {ctx.opsctl('install --only vault')}")
    return found


def pgp_key(path: str) -> str:
    """A PGP public key file (binary or ASCII-armoured) as Vault wants it: base64 of the binary."""
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise UsageError(f"cannot read PGP key {path}: {e.strerror}")
    if raw.lstrip().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"):
        lines = raw.decode(errors="replace").strip().splitlines()
        body = [line for line in lines[1:-1]
                if line and ":" not in line and not line.startswith("=")]
        try:
            raw = base64.b64decode("".join(body), validate=True)
        except ValueError:
            raise UsageError(f"{path} is not a valid ASCII-armoured PGP public key")
    if not raw or not raw[0] & 0x80:
        raise UsageError(f"{path} is not a PGP public key",
                         "export one with: gpg --export KEYID > key.gpg")
    return base64.b64encode(raw).decode()


def check_source(source: str, interactive: bool) -> None:
    if source not in SOURCES:
        raise UsageError(f"unknown --from '{source}'", "use file, stdin or prompt")
    if source == "prompt" and not interactive:
        raise UsageError("--from prompt needs a terminal", "use --from stdin in scripts")


def init(ctx: Context, key_shares: int | None, key_threshold: int | None, pgp_keys: list[str],
         show: bool) -> Result:
    """Refused on an initialised Vault; the shares go to the init file (0600)."""
    vault_server = server(ctx)
    settings = ctx.spec.vault
    shares = key_shares or settings.key_shares
    threshold = key_threshold or min(settings.key_threshold, shares)
    if threshold > shares:
        raise UsageError(f"--key-threshold {threshold} is more than --key-shares {shares}")
    keys = [pgp_key(p) for p in pgp_keys]
    if keys and len(keys) != shares:
        raise UsageError(f"{len(keys)} PGP key(s) for {shares} shares",
                         "give one --pgp-key per share, or set --key-shares to their number")
    record = vault_server.initialise_vault(shares, threshold, keys or None)
    summary = {"initialized": True, "key_shares": shares, "key_threshold": threshold,
               "pgp_encrypted": bool(keys), "init_file": str(vault_server.init_file)}
    if show:
        summary.update(keys=record["keys_base64"], root_token=record["root_token"])
    return Result(summary)


def _shares(source: str, vault_server, stdin: Iterable[str]) -> list[str]:
    from opsctl.files import read_json

    if source == "file":
        record = read_json(vault_server.init_file, default={}) or {}
        if record.get("pgp_encrypted"):
            raise UsageError(f"the shares in {vault_server.init_file} are PGP-encrypted",
                             "decrypt yours (gpg -d) and give them with --from stdin or --from prompt")
        if not record.get("keys_base64"):
            raise UsageError(f"{vault_server.init_file} holds no key shares",
                             "give them with --from stdin or --from prompt")
        return record["keys_base64"]
    if source == "stdin":
        return [line.strip() for line in stdin if line.strip()]
    return []  # prompt: asked one at a time


def unseal(ctx: Context, source: str, stdin: Iterable[str], prompt: Prompt) -> Result:
    vault_server = server(ctx)
    status = vault_server.seal_status()
    if not status["initialized"]:
        raise OpsError("Vault is not initialised", f"run: {ctx.opsctl('vault init')}")
    given = _shares(source, vault_server, stdin)
    shares, used = iter(given), []
    while status["sealed"]:
        if source == "prompt":
            share = prompt(f"Unseal key share ({status['progress']}/{status['t']} given): ")
        else:
            share = next(shares, None)
            if share is None:
                raise OpsError(f"Vault is still sealed: {status['progress']} of {status['t']} shares "
                               "given and no more to give", "give the remaining shares")
        status = vault_server.submit_share(share)
        used.append(share)
    # The first unseal after a PGP init makes opsctl's admin token from these shares.
    admin = vault.ensure_admin_token(ctx, given if source != "prompt" else used)
    return Result({"sealed": False, "admin_token": admin or "unchanged"})


def root_token(ctx: Context, source: str, key_file: str | None, stdin: Iterable[str], prompt: Prompt) -> Result:
    """A root token from the unseal shares (generate-root), PGP-encrypted with a key file;
    an expired admin token of opsctl's is made again first."""
    key = pgp_key(key_file) if key_file else None
    vault_server = server(ctx)
    status = vault_server.seal_status()
    if not status["initialized"] or status["sealed"]:
        raise OpsError("Vault is sealed or not initialised", f"run: {ctx.opsctl('vault unseal')}")
    shares = _shares(source, vault_server, stdin)
    if source == "prompt":
        shares = [prompt(f"Unseal key share {i + 1}/{status['t']}: ") for i in range(status["t"])]
    admin = vault.ensure_admin_token(ctx, shares)
    token = vault.generate_root(ctx, shares, key)
    return Result({"root_token": token, "pgp_encrypted": bool(key), "admin_token": admin or "unchanged"})


def status(ctx: Context) -> Result:
    found = server(ctx).seal_status()
    keys = ("initialized", "sealed", "t", "n", "progress", "version", "storage_type")
    return Result({k: found.get(k) for k in keys},
                  UNHEALTHY if not found["initialized"] or found["sealed"] else 0)
