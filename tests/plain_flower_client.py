"""A plain Flower client that claims an absurd sample count: flwr's public API only, no
import of the project, as anyone on the network could write it.

    python tests/plain_flower_client.py --server HOST:PORT --client-id 3 --claim 1000000000000

It declares only its id when it joins (no label histogram, so no declared count to check its
answers against) and answers every fit instruction with the weights it received, which pass
every check of the answer's tensors, and ``num_examples = --claim``. Unbounded, FedAvg would
give it all of the round's weight and the honest clients' training would be lost.
"""

from __future__ import annotations

import argparse

from flwr.client import NumPyClient, start_client


class Claimer(NumPyClient):
    """Returns what it was sent, claiming ``claimed`` samples."""

    def __init__(self, client_id: int, claimed: int) -> None:
        self.client_id = client_id
        self.claimed = claimed

    def get_properties(self, config):
        return {"client_id": self.client_id}

    def get_parameters(self, config):
        return []

    def fit(self, parameters, config):
        print(f"plain client {self.client_id}: answering with {self.claimed} samples",
              flush=True)
        return parameters, self.claimed, {"client_id": self.client_id, "loss": 0.1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--client-id", type=int, required=True)
    parser.add_argument("--claim", type=int, required=True)
    args = parser.parse_args()
    start_client(
        server_address=args.server, client=Claimer(args.client_id, args.claim).to_client(),
        insecure=True, transport="grpc-bidi", max_wait_time=120,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
