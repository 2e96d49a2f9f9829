"""A user's own Flower strategy, plugged in by dotted path in the deployment tests."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.server.strategy import FedAvg


class RecordingFedAvg(FedAvg):
    """FedAvg that appends every aggregation it performs to a JSON-lines file."""

    def __init__(self, record_to: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record_to = Path(record_to)

    def aggregate_fit(self, server_round, results, failures):
        with self.record_to.open("a") as sink:
            sink.write(json.dumps({"round": server_round, "results": len(results)}) + "\n")
        return super().aggregate_fit(server_round, results, failures)
