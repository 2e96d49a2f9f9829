"""One metered Flower round, as both the cloud and an edge drive it, and its record.

The driver takes Flower's steps itself (``configure_fit``, Flower's ``fit_clients``,
``aggregate_round``) instead of ``Server.fit_round``, so the round's summary comes back as a
value with the aggregate rather than being read back from the strategy afterwards. When the
strategy is a weighted mean (:mod:`fedphd.common.federation.running_mean`) the driver runs its
own copy of ``fit_clients`` instead (:func:`fit_and_fold`): each worker thread checks and folds
the answer it received, so the round never holds every answer at once.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from fedphd.common.federation.running_mean import RunningMean, metadata_only
from fedphd.common.federation.strategy import (
    EvaluationResult,
    ManagedStrategy,
    RoundAggregate,
    evaluation_results,
)
from fedphd.common.federation.summary import RoundSummary
from fedphd.common.federation.validation import answer_order, sender_name
from fedphd.common.wire.transport import (
    ClientProxy,
    Code,
    FitIns,
    FitRes,
    Server,
    Traffic,
    TrafficMeter,
    evaluate_clients,
    fit_clients,
)

log = logging.getLogger("fedphd.rounds")


@dataclass
class RoundOutcome:
    """The summary of a round and the bytes its messages took on this server's link."""

    summary: RoundSummary
    traffic: Traffic
    seconds: float
    updated: bool
    strategy_metrics: dict = field(default_factory=dict)
    # "running_sum": answers folded as they arrived; "list": held until the round ended.
    aggregation: str = "list"


@dataclass
class EvaluationOutcome:
    """An evaluation round at the clients: each one's result, the failures, the bytes."""

    results: list[EvaluationResult]
    failures: int
    traffic: Traffic


def run_fit_round(
    server: Server, strategy: ManagedStrategy, meter: TrafficMeter, server_round: int,
    timeout: float,
) -> RoundOutcome:
    """One fit round; the global model changes only when an aggregate came back."""
    start = time.perf_counter()
    manager = server.client_manager()
    instructions = strategy.configure_fit(server_round, server.parameters, manager)
    if not instructions:
        log.info("round %d: the strategy selected no peer", server_round)
        return RoundOutcome(RoundSummary(), meter.take(), time.perf_counter() - start, False)
    log.info("round %d: %d of %d peers selected", server_round, len(instructions),
             manager.num_available())
    if strategy.folds_answers():
        aggregate = fit_and_fold(strategy, instructions, server.max_workers, timeout,
                                 server_round)
    else:
        results, failures = fit_clients(instructions, max_workers=server.max_workers,
                                        timeout=timeout, group_id=server_round)
        aggregate = strategy.aggregate_round(server_round, results, failures)
    if aggregate.parameters is not None:
        server.parameters = aggregate.parameters
    return RoundOutcome(
        summary=aggregate.summary,
        traffic=meter.take(),
        seconds=time.perf_counter() - start,
        updated=aggregate.parameters is not None,
        strategy_metrics=dict(aggregate.metrics),
        aggregation="running_sum" if strategy.folds_answers() else "list",
    )


class _Folding:
    """What the worker threads of one folded round share: the running sum, the answers'
    metadata, the failures and the rejections (appends under the sum's own lock or the GIL)."""

    def __init__(self, strategy: ManagedStrategy, server_round: int, expected: int) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.mean: RunningMean = strategy.new_running_mean(expected)
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[tuple[ClientProxy, FitRes] | BaseException] = []
        self.rejected: list[tuple[tuple[str, str], str, str]] = []

    def fit_one(self, proxy: ClientProxy, ins: FitIns, timeout: float | None) -> None:
        """Flower's ``fit_client`` and ``_handle_finished_future_after_fit`` for one peer,
        then the list path's checks and the fold, in this worker thread."""
        try:
            res = proxy.fit(ins, timeout=timeout, group_id=self.server_round)
        except Exception as error:  # noqa: BLE001 - a failure, as in Flower's fit_clients
            self.mean.drop()
            self.failures.append(error)
            return
        if res.status.code != Code.OK:
            self.mean.drop()
            self.failures.append((proxy, res))
            return
        meta = metadata_only(res)
        self.results.append((proxy, meta))
        arrays = self.strategy.accept_answer(self.server_round, proxy, res)
        del res  # the received tensors go as soon as they are decoded
        if isinstance(arrays, str):
            self.mean.drop()
            self.rejected.append((answer_order((proxy, meta)), sender_name(proxy, meta), arrays))
            return
        self.mean.add(proxy, meta, arrays)


def fit_and_fold(
    strategy: ManagedStrategy, instructions: list[tuple[ClientProxy, FitIns]],
    max_workers: int | None, timeout: float | None, server_round: int,
) -> RoundAggregate:
    """Flower's ``fit_clients`` (same pool, timeout and failure semantics) with every answer
    checked and folded into a running sum by the thread that received it."""
    folding = _Folding(strategy, server_round, len(instructions))
    try:
        with futures.ThreadPoolExecutor(max_workers=max_workers) as executor:
            submitted = [executor.submit(folding.fit_one, proxy, ins, timeout)
                         for proxy, ins in instructions]
            for future in futures.as_completed(submitted):
                future.result()  # an error in the fold itself is a bug: raise it here
        rejected = {name: reason for _, name, reason in sorted(folding.rejected)}
        return strategy.aggregate_folded(server_round, folding.mean, folding.results,
                                         folding.failures, rejected)
    finally:
        folding.mean.close()


def run_evaluate_round(
    server: Server, strategy: ManagedStrategy, meter: TrafficMeter, server_round: int,
    timeout: float,
) -> EvaluationOutcome | None:
    """Flower's evaluate round at the clients (None when the strategy asks nobody, e.g. with
    the drivers' default ``fraction_evaluate = 0``)."""
    meter.take()  # what came before is not this round's
    instructions = strategy.configure_evaluate(server_round, server.parameters,
                                               server.client_manager())
    if not instructions:
        return None
    results, failures = evaluate_clients(instructions, max_workers=server.max_workers,
                                         timeout=timeout, group_id=server_round)
    strategy.aggregate_evaluate(server_round, results, failures)
    return EvaluationOutcome(evaluation_results(results), len(failures), meter.take())


def round_record(
    tier: str, server_round: int, outcome: RoundOutcome, bytes_per_link: dict[str, int],
    peers_key: str, reported_key: str, **extra: Any,
) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of one fit round, for the cloud and every edge alike.

    ``peers_key`` names the list of who answered (``participants`` at the cloud, ``clients``
    at an edge), ``reported_key`` the sizes the senders measured on their side; ``extra``
    holds what only one tier knows (placed after ``tier``, like the edge's id)."""
    summary = outcome.summary
    return {
        "tier": tier,
        **extra,
        "round": server_round,
        "loss": summary.loss,
        "num_examples": summary.num_examples,
        peers_key: summary.senders,
        # The weight each sender had in FedAvg-like strategies, and the claims cut to the cap.
        "examples_by_sender": summary.examples,
        "clipped": summary.clipped,
        "failures": summary.failures,
        "rejected": summary.rejected,
        "seconds": round(outcome.seconds, 3),
        "aggregation": outcome.aggregation,
        "bytes": bytes_per_link,
        # Properties and reconnect orders on this server's link, not in "bytes".
        "control_bytes": outcome.traffic.control,
        "digests_checked": summary.digests_checked,
        "digest_mismatches": summary.digest_mismatches,
        reported_key: {
            "received": summary.reported_received,
            "payload": summary.reported_payload,
        },
    }
