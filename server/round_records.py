"""The cloud's lines of ``metrics.jsonl`` for one cloud round: its edges' rounds and its own."""

from __future__ import annotations

import json
from typing import Any

from fedphd.common.federation.rounds import RoundOutcome, round_record
from fedphd.common.wire.keys import BYTES_DOWN_METRIC, BYTES_UP_METRIC, EDGE_LOG_METRIC
from fedphd.common.wire.limits import release_free_memory, rss_bytes
from fedphd.common.wire.transport import Scalar


def round_bytes(outcome: RoundOutcome, flat: bool) -> dict[str, int]:
    """Bytes per link and direction in one cloud round, as measured by each link's server."""
    if flat:
        return {"cloud->client": outcome.traffic.down, "client->cloud": outcome.traffic.up}
    metrics = outcome.summary.metrics
    return {
        "cloud->edge": outcome.traffic.down,
        "edge->cloud": outcome.traffic.up,
        "edge->client": sum(int(m.get(BYTES_DOWN_METRIC, 0)) for m in metrics),
        "client->edge": sum(int(m.get(BYTES_UP_METRIC, 0)) for m in metrics),
    }


def edge_records(outcome: RoundOutcome) -> list[dict[str, Any]]:
    """The edge rounds' lines each edge's answer carries (none in flat mode)."""
    return [record for metrics in outcome.summary.metrics
            for record in json.loads(str(metrics.get(EDGE_LOG_METRIC, "[]")))]


def rss_after_round() -> int:
    """Resident memory once the round's freed buffers went back to the OS."""
    release_free_memory()
    return rss_bytes()


def _maybe_json(value: Scalar) -> Any:
    """Strategy metrics are Flower scalars; structured ones arrive as JSON strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def cloud_record(
    server_round: int, outcome: RoundOutcome, per_link: dict[str, int], waited: float,
    cumulative: dict[str, int],
) -> dict[str, Any]:
    """The ``cloud`` line: the fields every tier writes, plus what only the cloud knows."""
    return {
        **round_record("cloud", server_round, outcome, per_link,
                       peers_key="participants", reported_key="reported_by_peers"),
        "model_updated": outcome.updated,
        # Before the round, for peers that were there in the previous one.
        "waited_seconds": round(waited, 3),
        "bytes_cumulative": dict(cumulative),
        "strategy": {key: _maybe_json(value) for key, value in outcome.strategy_metrics.items()},
        # Resident memory after the round: it must not grow round after round.
        "rss_mb": round(rss_after_round() / 2**20, 1),
    }
