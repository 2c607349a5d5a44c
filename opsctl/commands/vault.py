"""opsctl vault: initialise, unseal and configure the platform's Vault."""

from __future__ import annotations

import base64
import sys
from typing import Annotated, List, Optional

import typer

from opsctl import ui
from opsctl.commands import reconcile
from opsctl.commands.common import OutputOption, context, set_output
from opsctl.errors import UNHEALTHY, OpsError, UsageError

app = typer.Typer(help="Vault: init, unseal, status, and its JWT auth and service secrets.",
                  no_args_is_help=True)


def _server():
    from opsctl.components import build

    server = build("vault", context())
    if not server.probe():
        raise OpsError(f"Vault is not running at {server.addr}", "run: opsctl install --only vault")
    return server


def _pgp_key(path: str) -> str:
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


@app.command()
def init(
    key_shares: Annotated[Optional[int], typer.Option(
        min=1, max=10, help="Number of unseal key shares [default: vault.key_shares].")] = None,
    key_threshold: Annotated[Optional[int], typer.Option(
        min=1, max=10, help="Shares needed to unseal [default: vault.key_threshold].")] = None,
    pgp_key: Annotated[Optional[List[str]], typer.Option(
        metavar="FILE", help="Encrypt share i to the i-th PGP public key (one per share).")] = None,
    show: Annotated[bool, typer.Option(
        "--show", help="Also print the shares and the root token.")] = False,
    output: OutputOption = ui.Output.text,
) -> None:
    """Initialise Vault, like `vault operator init`. Refused if already initialised."""
    set_output(output)
    server = _server()
    settings = server.ctx.spec.vault
    shares = key_shares or settings.key_shares
    threshold = key_threshold or min(settings.key_threshold, shares)
    if threshold > shares:
        raise UsageError(f"--key-threshold {threshold} is more than --key-shares {shares}")
    keys = [_pgp_key(p) for p in pgp_key or []]
    if keys and len(keys) != shares:
        raise UsageError(f"{len(keys)} PGP key(s) for {shares} shares",
                         "give one --pgp-key per share, or set --key-shares to their number")
    record = server.initialise_vault(shares, threshold, keys or None)
    summary = {"initialized": True, "key_shares": shares, "key_threshold": threshold,
               "pgp_encrypted": bool(keys), "init_file": str(server.init_file)}
    if show:
        summary.update(keys=record["keys_base64"], root_token=record["root_token"])
    if output == ui.Output.json:
        ui.print_json(summary)
        return
    how = "each encrypted to its PGP key" if keys else "in plain text"
    ui.info(f"Vault initialised: {shares} key shares ({how}), threshold {threshold}.")
    ui.info(f"Shares saved to {server.init_file} (mode 0600); keep a copy offline. At unseal opsctl "
            "makes itself an admin token and revokes the root token.")
    if show:
        for i, key in enumerate(record["keys_base64"], 1):
            ui.out(f"Unseal key {i}: {key}")
        ui.out(f"Root token: {record['root_token']}")
    ui.info("Next: opsctl vault unseal")


def _shares_from(source: str, server) -> list[str]:
    from opsctl.files import read_json

    if source == "file":
        record = read_json(server.init_file, default={}) or {}
        if record.get("pgp_encrypted"):
            raise UsageError(f"the shares in {server.init_file} are PGP-encrypted",
                             "decrypt yours (gpg -d) and give them with --from stdin or --from prompt")
        if not record.get("keys_base64"):
            raise UsageError(f"{server.init_file} holds no key shares",
                             "give them with --from stdin or --from prompt")
        return record["keys_base64"]
    if source == "stdin":
        return [line.strip() for line in sys.stdin if line.strip()]
    return []  # prompt: asked one at a time


@app.command()
def unseal(
    source: Annotated[str, typer.Option(
        "--from", help="file (the init file), stdin (one share a line) or prompt.")] = "file",
    output: OutputOption = ui.Output.text,
) -> None:
    """Unseal Vault with key shares from the init file, stdin or a hidden prompt."""
    set_output(output)
    if source not in ("file", "stdin", "prompt"):
        raise UsageError(f"unknown --from '{source}'", "use file, stdin or prompt")
    if source == "prompt" and not sys.stdin.isatty():
        raise UsageError("--from prompt needs a terminal", "use --from stdin in scripts")
    server = _server()
    status = server.seal_status()
    if not status["initialized"]:
        raise OpsError("Vault is not initialised", "run: opsctl vault init")
    given = _shares_from(source, server)
    shares, used = iter(given), []
    while status["sealed"]:
        if source == "prompt":
            import getpass

            share = getpass.getpass(f"Unseal key share ({status['progress']}/{status['t']} given): ")
        else:
            share = next(shares, None)
            if share is None:
                raise OpsError(f"Vault is still sealed: {status['progress']} of {status['t']} shares "
                               "given and no more to give", "give the remaining shares")
        status = server.submit_share(share)
        used.append(share)
    # The first unseal after a PGP init makes opsctl's admin token from these shares.
    from opsctl.components import vault

    admin = vault.ensure_admin_token(server.ctx, given if source != "prompt" else used)
    ui.render_or_json(output, {"sealed": False, "admin_token": admin or "unchanged"},
                      lambda: ui.info("Vault is unsealed." + (f" ({admin})" if admin else "")))


@app.command("root-token")
def root_token(
    generate: Annotated[bool, typer.Option(
        "--generate", help="Generate a root token from the unseal key shares and print it.")] = False,
    source: Annotated[str, typer.Option(
        "--from", help="file (the init file), stdin (one share a line) or prompt.")] = "file",
    pgp_key: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Encrypt the new root token to this PGP public key.")] = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """A root token, for when one is truly needed: made from the unseal key shares
    (generate-root) and printed, PGP-encrypted with --pgp-key. opsctl itself works with its
    admin token, which this also makes again if it has expired. Revoke the root token when
    done (opsctl revokes every root token when it next makes its admin token)."""
    set_output(output)
    if not generate:
        raise UsageError("opsctl vault root-token only generates a root token, and only with --generate",
                         "opsctl works with its own admin token; when a root token is truly needed: "
                         "opsctl vault root-token --generate [--from stdin] [--pgp-key FILE]")
    if source not in ("file", "stdin", "prompt"):
        raise UsageError(f"unknown --from '{source}'", "use file, stdin or prompt")
    if source == "prompt" and not sys.stdin.isatty():
        raise UsageError("--from prompt needs a terminal", "use --from stdin in scripts")
    key = _pgp_key(pgp_key) if pgp_key else None
    server = _server()
    status = server.seal_status()
    if not status["initialized"] or status["sealed"]:
        raise OpsError("Vault is sealed or not initialised", "run: opsctl vault unseal")
    shares = _shares_from(source, server)
    if source == "prompt":
        import getpass

        shares = [getpass.getpass(f"Unseal key share {i + 1}/{status['t']}: ") for i in range(status["t"])]
    from opsctl.components import vault

    admin = vault.ensure_admin_token(server.ctx, shares)  # an expired one is made again first
    token = vault.generate_root(server.ctx, shares, key)
    data = {"root_token": token, "pgp_encrypted": bool(key), "admin_token": admin or "unchanged"}
    if output == ui.Output.json:
        ui.print_json(data)
        return
    if admin:
        ui.info(f"opsctl's {admin}.")
    ui.out(f"Root token{' (PGP-encrypted, base64)' if key else ''}: {token}")
    ui.info("Revoke it when done: VAULT_TOKEN=<it> bao token revoke -self"
            + (" (decrypt it first: base64 -d | gpg -d)" if key else ""))


@app.command()
def status(output: OutputOption = ui.Output.text) -> None:
    """Seal status: initialised, sealed, shares and threshold, version. Exits 3 if sealed."""
    set_output(output)
    status = _server().seal_status()
    keys = ("initialized", "sealed", "t", "n", "progress", "version", "storage_type")
    data = {k: status.get(k) for k in keys}
    ui.render_or_json(output, data, lambda: ui.table(None, ["field", "value"], [
        ["initialised", str(status["initialized"]).lower()],
        ["sealed", str(status["sealed"]).lower()],
        ["key shares / threshold", f"{status.get('n')} / {status.get('t')}"],
        ["unseal progress", str(status.get("progress"))],
        ["version", status.get("version", "")],
        ["storage", status.get("storage_type", "")],
    ]))
    if not status["initialized"] or status["sealed"]:
        raise typer.Exit(UNHEALTHY)


@app.command()
def apply(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes; make none.")] = False,
    output: OutputOption = ui.Output.text,
) -> None:
    """Configure JWT auth, the reader policy, the service roles and the services' credentials."""
    set_output(output)
    from opsctl.app import config

    reconcile.render(config.apply(config.vault_steps(context(dry_run=dry_run)), dry_run), output, "vault")


@app.command()
def diff(output: OutputOption = ui.Output.text) -> None:
    """Drift between the spec and Vault (and the service users it holds). Exits 0 in sync,
    1 on drift, 2 on an error."""
    set_output(output)
    from opsctl.app import config

    reconcile.render(config.diff(lambda: config.vault_steps(context(dry_run=True))), output, "vault")
