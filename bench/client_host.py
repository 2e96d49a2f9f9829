"""Several real clients in one process, one thread each (for ``bench.scale``).

A ``fedphd client`` process costs ~300 MB before it holds a model (torch, diffusers, Flower),
so 100 or 200 of them do not fit a small machine. This host runs the product's own
``DiffusionClient`` objects — each with its own partition, trainer, optimiser and gRPC
connection (``connect_client``, Flower's ``start_client``) — in threads of one process. The
server cannot tell them from separate processes; they share the interpreter and torch's
thread pool, so their local training is serialised by the host, not by the server.

    python -m bench.client_host --config RUN.toml --server HOST:PORT --first 0 --count 25
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from fedphd.client.client import DiffusionClient, local_data
from fedphd.common.settings.config import load_config
from fedphd.common.settings.runtime import seed_everything, setup_torch
from fedphd.common.wire.tls import client_root_certificates
from fedphd.common.wire.transport import connect_client

log = logging.getLogger("bench.client_host")


def serve_client(client: DiffusionClient, address: str, wait: float,
                 root_certificates: bytes | None, failures: list[str]) -> None:
    """The client command's connect loop (follows a move to another edge) in a thread."""
    try:
        while True:
            connect_client(address, client, max_wait_time=wait,
                           root_certificates=root_certificates)
            if client.move_to is None:
                return
            address, client.move_to = client.move_to, None
    except Exception as error:  # noqa: BLE001 - reported by the host's exit status
        log.exception("client %d failed", client.client_id)
        failures.append(f"client {client.client_id}: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client_host",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--server", required=True, metavar="HOST:PORT")
    parser.add_argument("--first", type=int, required=True, help="first client id")
    parser.add_argument("--count", type=int, required=True, help="clients in this process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    cfg = load_config(args.config)
    root_certificates = client_root_certificates(cfg.tls)
    seed_everything(cfg.seed + args.first)
    device = setup_torch(cfg.training)
    ids = range(args.first, args.first + args.count)
    clients = [DiffusionClient(cfg, cid, local_data(cfg, cid), device) for cid in ids]
    log.info("hosting clients %d..%d, connecting to %s", ids[0], ids[-1], args.server)
    failures: list[str] = []
    threads = [
        threading.Thread(target=serve_client, name=f"client-{c.client_id}", daemon=True,
                         args=(c, args.server, cfg.topology.connect_timeout,
                               root_certificates, failures))
        for c in clients
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        log.error("%d clients failed: %s", len(failures), "; ".join(failures[:5]))
        return 1
    log.info("all %d clients disconnected by the server", len(clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
