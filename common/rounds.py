"""One metered Flower fit round, as both the cloud and an edge drive it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.strategy import ManagedStrategy, RoundSummary
from common.transport import Server, Traffic, TrafficMeter


@dataclass
class RoundOutcome:
    """The summary of a round and the bytes its messages took on this server's link."""

    summary: RoundSummary
    traffic: Traffic
    seconds: float
    updated: bool
    strategy_metrics: dict = field(default_factory=dict)


def run_fit_round(
    server: Server, strategy: ManagedStrategy, meter: TrafficMeter, server_round: int,
    timeout: float,
) -> RoundOutcome:
    """``Server.fit_round``; the global model changes only when an aggregate came back."""
    start = time.perf_counter()
    strategy.last_round = RoundSummary()
    result = server.fit_round(server_round=server_round, timeout=timeout)
    updated = False
    if result is not None and result[0] is not None:
        server.parameters = result[0]
        updated = True
    return RoundOutcome(
        summary=strategy.last_round,
        traffic=meter.take(),
        seconds=time.perf_counter() - start,
        updated=updated,
        strategy_metrics=dict(result[1]) if result is not None else {},
    )
