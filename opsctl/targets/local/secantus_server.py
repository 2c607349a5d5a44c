"""Runs SecantusDB (the MongoDB-wire-compatible server from PyPI) as a replica set member.

`secantusd-py` hard-codes its replica set name; change streams need the one the platform
names (rs0). SIGTERM/SIGINT are blocked in every thread and taken synchronously by the
main thread, so a shutdown signal can never land on a worker thread and be lost.

With --admin-user (and its password in $SECANTUS_ADMIN_PASSWORD, never on the command
line), the server requires authentication: that user, with role root on admin, is written
into the store before the server listens, so there is never a moment without a login
(SecantusDB has no localhost exception to create the first user through).

Usage: python -m opsctl.targets.local.secantus_server --host H --port P --storage-path DIR --replset rs0 [--admin-user NAME]
"""

import argparse
import contextlib
import logging
import os
import signal
import socket

SIGNALS = {signal.SIGTERM, signal.SIGINT}


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # before any thread exists
    from secantus import SecantusDBServer, __version__

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--storage-path", required=True)
    parser.add_argument("--replset", required=True)
    parser.add_argument("--cache-size", default="256M")
    parser.add_argument("--admin-user")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    password = os.environ.pop("SECANTUS_ADMIN_PASSWORD", "")
    if args.admin_user and not password:
        parser.error("--admin-user needs its password in $SECANTUS_ADMIN_PASSWORD")
    server = SecantusDBServer(
        host=args.host, port=args.port, storage_path=args.storage_path,
        replica_set_name=args.replset, enable_test_commands=False,
        cache_size=args.cache_size, sync_on_commit=True,  # an acknowledged write is on disk
        require_auth=bool(args.admin_user),
    )
    if args.admin_user:
        _ensure_admin(server.storage, args.admin_user, password)
    server.start()
    logging.info("secantus %s ready on %s:%d, replica set %s", __version__, args.host, args.port,
                 args.replset)
    received = signal.sigwait(SIGNALS)
    logging.info("got %s, stopping", signal.Signals(received).name)
    # close() alone does not wake the accept() thread on Linux (a 2 s join timeout).
    with contextlib.suppress(OSError, AttributeError):
        server._socket.shutdown(socket.SHUT_RDWR)
    server.stop()
    logging.info("stopped cleanly")


def _ensure_admin(storage, user: str, password: str) -> None:
    """The admin user (root on admin) with this password, as createUser would store it;
    rewritten at every start, so a password changed in secrets.json takes effect."""
    from secantus.auth import SCRAM_SHA_256, derive_credentials

    record = {"_id": f"admin.{user}", "user": user, "db": "admin",
              "credentials": derive_credentials(password, mechanism=SCRAM_SHA_256).to_doc(),
              "roles": [{"role": "root", "db": "admin"}], "mechanisms": [SCRAM_SHA_256]}
    storage.add_user("admin", user, record, replace=True)


if __name__ == "__main__":
    main()
