"""Runs SecantusDB (the MongoDB-wire-compatible server from PyPI) as a replica set member.

`secantusd-py` hard-codes its replica set name; change streams need the one the platform
names (rs0). SIGTERM/SIGINT are blocked in every thread and taken synchronously by the
main thread, so a shutdown signal can never land on a worker thread and be lost.

Usage: python -m opsctl.targets.local.secantus_server --host H --port P --storage-path DIR --replset rs0
"""

import argparse
import contextlib
import logging
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = SecantusDBServer(
        host=args.host, port=args.port, storage_path=args.storage_path,
        replica_set_name=args.replset, enable_test_commands=False,
        cache_size=args.cache_size, sync_on_commit=True,  # an acknowledged write is on disk
    )
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


if __name__ == "__main__":
    main()
