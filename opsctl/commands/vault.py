"""opsctl vault: initialise, unseal and configure the platform's Vault."""

from __future__ import annotations

import sys
from typing import Annotated, List, Optional

import typer

from opsctl import ui
from opsctl.commands import reconcile
from opsctl.commands.common import (KubeconfigOption, KubeContextOption, OutputOption, TargetOption, context,
                                   set_output)
from opsctl.errors import UsageError

app = typer.Typer(help="Vault: init, unseal, status, and its JWT auth and service secrets.",
                  no_args_is_help=True)


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
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Initialise Vault, like `vault operator init`. Refused if already initialised."""
    set_output(output)
    from opsctl.app import vault

    ctx = context(target, False, kube_context, kubeconfig)
    result = vault.init(ctx, key_shares, key_threshold, pgp_key or [], show)
    summary = result.data
    if output == ui.Output.json:
        ui.print_json(summary)
        return
    shares, threshold = summary["key_shares"], summary["key_threshold"]
    how = "each encrypted to its PGP key" if summary["pgp_encrypted"] else "in plain text"
    ui.info(f"Vault initialised: {shares} key shares ({how}), threshold {threshold}.")
    ui.info(f"Shares saved to {summary['init_file']} (mode 0600); keep a copy offline. At unseal opsctl "
            "makes itself an admin token and revokes the root token.")
    if show:
        for i, key in enumerate(summary["keys"], 1):
            ui.out(f"Unseal key {i}: {key}")
        ui.out(f"Root token: {summary['root_token']}")
    ui.info("Next: opsctl vault unseal")


@app.command()
def unseal(
    source: Annotated[str, typer.Option(
        "--from", help="file (the init file), stdin (one share a line) or prompt.")] = "file",
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Unseal Vault with key shares from the init file, stdin or a hidden prompt."""
    set_output(output)
    import getpass

    from opsctl.app import vault

    vault.check_source(source, sys.stdin.isatty())
    result = vault.unseal(context(target, False, kube_context, kubeconfig), source, sys.stdin, getpass.getpass)
    admin = result.data["admin_token"]
    ui.render_or_json(output, result.data, lambda: ui.info(
        "Vault is unsealed." + (f" ({admin})" if admin != "unchanged" else "")))


@app.command("root-token")
def root_token(
    generate: Annotated[bool, typer.Option(
        "--generate", help="Generate a root token from the unseal key shares and print it.")] = False,
    source: Annotated[str, typer.Option(
        "--from", help="file (the init file), stdin (one share a line) or prompt.")] = "file",
    pgp_key: Annotated[Optional[str], typer.Option(
        metavar="FILE", help="Encrypt the new root token to this PGP public key.")] = None,
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
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
    import getpass

    from opsctl.app import vault

    vault.check_source(source, sys.stdin.isatty())
    ctx = context(target, False, kube_context, kubeconfig)
    data = vault.root_token(ctx, source, pgp_key, sys.stdin, getpass.getpass).data
    if output == ui.Output.json:
        ui.print_json(data)
        return
    encrypted = data["pgp_encrypted"]
    if data["admin_token"] != "unchanged":
        ui.info(f"opsctl's {data['admin_token']}.")
    ui.out(f"Root token{' (PGP-encrypted, base64)' if encrypted else ''}: {data['root_token']}")
    ui.info("Revoke it when done: VAULT_TOKEN=<it> bao token revoke -self"
            + (" (decrypt it first: base64 -d | gpg -d)" if encrypted else ""))


@app.command()
def status(target: TargetOption = None, kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
           output: OutputOption = ui.Output.text) -> None:
    """Seal status: initialised, sealed, shares and threshold, version. Exits 3 if sealed."""
    set_output(output)
    from opsctl.app import vault

    result = vault.status(context(target, False, kube_context, kubeconfig))
    status = result.data
    ui.render_or_json(output, status, lambda: ui.table(None, ["field", "value"], [
        ["initialised", str(status["initialized"]).lower()],
        ["sealed", str(status["sealed"]).lower()],
        ["key shares / threshold", f"{status.get('n')} / {status.get('t')}"],
        ["unseal progress", str(status.get("progress"))],
        ["version", status.get("version") or ""],
        ["storage", status.get("storage_type") or ""],
    ]))
    raise typer.Exit(result.code)


@app.command()
def apply(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the changes; make none.")] = False,
    target: TargetOption = None,
    kube_context: KubeContextOption = None,
    kubeconfig: KubeconfigOption = None,
    output: OutputOption = ui.Output.text,
) -> None:
    """Configure JWT auth, the reader policy, the service roles and the services' credentials."""
    set_output(output)
    from opsctl.app import config

    steps = config.vault_steps(context(target, dry_run, kube_context, kubeconfig))
    reconcile.render(config.apply(steps, dry_run), output, "vault")


@app.command()
def diff(target: TargetOption = None, kube_context: KubeContextOption = None, kubeconfig: KubeconfigOption = None,
         output: OutputOption = ui.Output.text) -> None:
    """Drift between the spec and Vault (and the service users it holds). Exits 0 in sync,
    1 on drift, 2 on an error."""
    set_output(output)
    from opsctl.app import config

    steps = lambda: config.vault_steps(context(target, True, kube_context, kubeconfig))  # noqa: E731
    reconcile.render(config.diff(steps), output, "vault")
