"""Several real clients in one process, one thread each (for ``bench.scale``).

A ``fedphd client`` process costs ~300 MB before it holds a model (torch, diffusers, Flower),
so 100 or 200 of them do not fit a small machine. This host runs the product's own
``DiffusionClient`` objects — each with its own partition, trainer, optimiser and gRPC
connection (``connect_client``, Flower's ``start_client``) — in threads of one process. The
server cannot tell them from separate processes; they share the interpreter and torch's
thread pool, so their local training is serialised by the host, not by the server.

Lean by default (bench only; the product's client keeps its model): the host's clients share
one U-Net and trainer (optimiser, noise generator), one client at a time (a lock); a client
takes it when an instruction arrives (with its own batch stream), loads the received global
model into it as usual, answers, and lets go of it, its resume snapshot and the copy of the
model it received. The Adam state is so shared among a host's clients, which a round of 0 or
1 local steps barely notices, and the host's memory is its interpreter and one model plus what
its clients keep between rounds (data, random streams) instead of ~43 MiB per client.
``--keep-models`` hosts the clients exactly as shipped.

    python -m bench.client_host --config RUN.toml --server HOST:PORT --first 0 --count 25
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from fedphd.client.client import DiffusionClient, local_data
from fedphd.client.replay import RoundReplay
from fedphd.common.core.diffusion import DiffusionTrainer, endless_batches
from fedphd.common.federation.held import HeldModel
from fedphd.common.settings.config import load_config
from fedphd.common.settings.runtime import seed_everything, setup_torch
from fedphd.common.wire.keys import ARCH_KEY
from fedphd.common.wire.limits import release_free_memory
from fedphd.common.wire.tls import client_root_certificates
from fedphd.common.wire.transport import FitIns, FitRes, connect_client

log = logging.getLogger("bench.client_host")

# One hosted client trains at a time, in the host's one model (per architecture).
TRAINING = threading.Lock()
SHARED: dict[str, DiffusionTrainer] = {}


class LeanClient(DiffusionClient):
    """The product's client, holding a model only while it answers (module docstring)."""

    def fit(self, ins: FitIns) -> FitRes:
        with TRAINING:
            self.borrow(str(ins.config.get(ARCH_KEY, "")))
            try:
                return super().fit(ins)
            finally:
                self.release()

    def borrow(self, arch_json: str) -> None:
        """Take the host's model of this architecture, if one was built (else fit builds it)."""
        trainer = SHARED.get(arch_json)
        if trainer is None:
            return
        training = self.local.training_config()
        self.local.trainer, self.local.arch_json = trainer, arch_json
        self.local.batches = endless_batches(self.local.dataset, training.batch_size,
                                             training.seed, self.device)

    def release(self) -> None:
        """Hand the model back; forget the batch stream, resume snapshot and received copy."""
        if self.local.trainer is not None and self.local.arch_json is not None:
            SHARED.clear()  # one architecture at a time
            SHARED[self.local.arch_json] = self.local.trainer
        self.local.trainer, self.local.batches, self.local.arch_json = None, None, None
        self.replay = RoundReplay(self.client_id)
        if hasattr(self.link, "held"):  # the model it received (fp32 links need no base)
            self.link.held = HeldModel()
        release_free_memory()


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
    parser.add_argument("--keep-models", action="store_true",
                        help="host the clients as shipped (each keeps its model and optimiser)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    cfg = load_config(args.config)
    root_certificates = client_root_certificates(cfg.tls)
    seed_everything(cfg.seed + args.first)
    device = setup_torch(cfg.training)
    ids = range(args.first, args.first + args.count)
    kind = DiffusionClient if args.keep_models else LeanClient
    clients = [kind(cfg, cid, local_data(cfg, cid), device) for cid in ids]
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
