"""A stock Flower server (flwr's public API only, no import of the project): FedAvg over
random initial weights, one round, as anyone could start it on a port a FedPhD client dials.

    python tests/plain_flower_server.py --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse

import numpy as np
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerConfig, start_server
from flwr.server.strategy import FedAvg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    args = parser.parse_args()
    weights = [np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)]
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters(weights), min_fit_clients=1,
                      min_available_clients=1, fraction_evaluate=0.0)
    start_server(server_address=args.listen, strategy=strategy,
                 config=ServerConfig(num_rounds=1, round_timeout=60))
    print("plain server: finished", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
