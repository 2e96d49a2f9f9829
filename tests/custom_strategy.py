"""A user's own Flower strategy, plugged in by dotted path in the deployment tests."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.server.strategy import FedAvg
from flwr.serverapp.strategy import FedAvg as MessageFedAvg


class RecordingFedAvg(FedAvg):
    """FedAvg that appends every aggregation it performs to a JSON-lines file."""

    def __init__(self, record_to: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record_to = Path(record_to)

    def aggregate_fit(self, server_round, results, failures):
        with self.record_to.open("a") as sink:
            sink.write(json.dumps({"round": server_round, "results": len(results)}) + "\n")
        return super().aggregate_fit(server_round, results, failures)


class RecordingMessageFedAvg(MessageFedAvg):
    """A user's subclass of Flower's message-API FedAvg: it records, per aggregation, the
    replies it got (sender node, metric keys, number of arrays), then averages as FedAvg."""

    def __init__(self, record_to: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record_to = Path(record_to)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        seen = [{"node": reply.metadata.src_node_id,
                 "metrics": sorted(next(iter(reply.content.metric_records.values())).keys()),
                 "arrays": len(next(iter(reply.content.array_records.values())))}
                for reply in replies if not reply.has_error()]
        with self.record_to.open("a") as sink:
            sink.write(json.dumps({"round": server_round, "replies": seen}) + "\n")
        return super().aggregate_train(server_round, replies)
