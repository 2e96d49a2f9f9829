"""What a driver records about one fit round: samples, loss, label histogram, who answered."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from fedphd.common.wire.keys import (
    BYTES_RECEIVED_METRIC,
    LABEL_HIST_METRIC,
    LOSS_METRIC,
    PAYLOAD_BYTES_METRIC,
)
from fedphd.common.wire.transport import (
    FitRes,
    Scalar,
)


@dataclass
class RoundSummary:
    """What the driver records about one fit round."""

    num_examples: int = 0
    loss: float | None = None
    label_hist: list[int] = field(default_factory=list)
    senders: list[str] = field(default_factory=list)
    # Samples each accepted sender counted for (after the cap), and the senders whose claim
    # was cut to the cap: {sender: {"claimed": n, "counted": cap}}.
    examples: dict[str, int] = field(default_factory=dict)
    clipped: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failures: int = 0
    metrics: list[dict[str, Scalar]] = field(default_factory=list)
    # Sizes the senders measured on their side: instruction bytes received, tensor bytes sent.
    reported_received: int = 0
    reported_payload: int = 0
    # Receivers that reported the digest of the model they rebuilt, and those whose digest
    # differed from what was sent.
    digests_checked: int = 0
    digest_mismatches: list[str] = field(default_factory=list)


def add_histograms(first: list[int], second: list[int]) -> list[int]:
    """Element-wise sum of two label histograms (the shorter one padded with zeros)."""
    size = max(len(first), len(second))
    return [
        (first[i] if i < len(first) else 0) + (second[i] if i < len(second) else 0)
        for i in range(size)
    ]


def summarise(accepted: list[FitRes]) -> RoundSummary:
    """Sample-weighted loss and summed label histograms of the accepted answers."""
    summary = RoundSummary(metrics=[dict(res.metrics) for res in accepted])
    weighted, weight = 0.0, 0
    for res in accepted:
        summary.num_examples += res.num_examples
        # NaN: the sender does not know its loss; it still counts for samples and labels.
        if LOSS_METRIC in res.metrics and not np.isnan(float(res.metrics[LOSS_METRIC])):
            weighted += float(res.metrics[LOSS_METRIC]) * res.num_examples
            weight += res.num_examples
        summary.reported_received += int(res.metrics.get(BYTES_RECEIVED_METRIC, 0))
        summary.reported_payload += int(res.metrics.get(PAYLOAD_BYTES_METRIC, 0))
        hist = [int(c) for c in json.loads(str(res.metrics.get(LABEL_HIST_METRIC, "[]")))]
        summary.label_hist = add_histograms(summary.label_hist, hist)
    summary.loss = weighted / weight if weight else None
    return summary
