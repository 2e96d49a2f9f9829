"""Weighted means folded as the answers arrive: a server's memory does not grow with its clients.

A strategy whose aggregate is a sample-weighted mean (Flower's ``FedAvg`` and its subclasses
that keep FedAvg's ``aggregate_fit``, e.g. ``FedProx`` and the project's ``MOON``, or any
strategy that declares it, below) does not need the round's answers as a list: the driver
(:func:`fedphd.common.federation.rounds.run_fit_round`) decodes and checks each answer in the
worker thread that received it (every check of the list path,
:meth:`~fedphd.common.federation.strategy.ManagedStrategy.accept_answer`), folds its tensors
into ``S = sum_k n_k * w_k`` and drops them; only the answer's metadata (status, sample count,
metrics: no tensors) is kept for the round's summary, the downlink bookkeeping and the
strategy's ``fit_metrics_aggregation_fn``, which still gets every ``(n_k, metrics_k)``. The
model is ``S / sum_k n_k``: the same operations as Flower's ``aggregate`` (``inplace=False``),
so for the same order of answers the result is bit-identical to it, and within float
tolerance of FedAvg's default ``aggregate_inplace``. Answers arrive in completion order where
the list path sorts them by sender, so two runs agree to float tolerance, not bit for bit.

The protocol: a strategy class attribute ``running_sum``. ``True`` declares that the
strategy's ``aggregate_fit`` is FedAvg's: the sample-weighted mean of the answers' arrays,
metrics from its ``fit_metrics_aggregation_fn`` (when it has one), no model when there were
failures and its ``accept_failures`` is false. ``False`` makes a FedAvg subclass take the list
path (:class:`ListFedAvg` is FedAvg so, for comparisons). Absent: FedAvg and the subclasses
that do not override ``aggregate_fit`` fold; every other strategy gets the list as before.

Sample-count bound, exactly as the list path: each answer counts ``min(n_k, C)`` with
``C = examples_cap(accepted counts)`` (``topology.max_examples_factor`` x the round's low median,
:func:`~fedphd.common.federation.validation.examples_cap`), which depends on counts that have
not arrived yet. Only the low median's *lower bound* is known on arrival: the answers still
outstanding may all come back with 1 sample (an answer that fails or is rejected cannot lower
it more). So ``C_low = cap(median_low(counts so far + [1] x outstanding))`` is a floor of the
final cap, and an answer with ``n_k <= C_low`` counts exactly ``n_k``: it is folded at once.
An answer above that floor may be clipped; its decoded tensors are written to a temporary
file (not held in memory) and folded with ``min(n_k, C)`` once the round's answers are all in.
Bounding by what the peers declared at join was not used: the list path's cap moves with the
answers that actually count (a failure or a rejection shifts the median), so a cap fixed in
advance would give different weights than the list path in exactly those rounds. With the
default factor 10 and similar-sized clients, answers wait on disk only until about half the
round has answered; with equal sizes and 10 samples or fewer per client, never.

Fold order: the answers folded at once in arrival order, then those written to disk in
arrival order (:attr:`RunningMean.fold_order`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from fedphd.common.federation.validation import (
    Clipped,
    answer_order,
    examples_cap,
    sender_name,
)
from fedphd.common.wire.transport import (
    ClientProxy,
    FedAvg,
    FitRes,
    Parameters,
    Scalar,
    Strategy,
)

RUNNING_SUM_ATTRIBUTE = "running_sum"


def folds_answers(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates by FedAvg's weighted mean (module docstring)."""
    declared = getattr(strategy, RUNNING_SUM_ATTRIBUTE, None)
    if declared is not None:
        return bool(declared)
    return (isinstance(strategy, FedAvg)
            and type(strategy).aggregate_fit is FedAvg.aggregate_fit)


class ListFedAvg(FedAvg):
    """Flower's FedAvg on the list path: every answer held until the round ends (for
    comparisons, e.g. ``bench.scale --list-path``)."""

    running_sum = False


def metadata_only(res: FitRes) -> FitRes:
    """The answer without its tensors: what the summary and the bookkeeping read."""
    return FitRes(status=res.status, parameters=Parameters(tensors=[], tensor_type=""),
                  num_examples=res.num_examples, metrics=res.metrics)


@dataclasses.dataclass
class _Pending:
    """An answer that may be clipped: its tensors on disk until the cap is known."""

    sender: str
    num_examples: int
    path: Path


class RunningMean:
    """``sum_k min(n_k, C) * w_k`` over a round's accepted answers, folded as they arrive.

    Thread-safe: the driver's worker threads call :meth:`add` and :meth:`drop`; the driver
    calls :meth:`finish` once every instruction has ended."""

    def __init__(self, expected: int, factor: float, spill_dir: str | None = None) -> None:
        self.factor = factor
        self._outstanding = expected
        self._positive: list[int] = []  # sorted sample counts > 0 of the accepted answers
        self._answers: list[tuple[ClientProxy, FitRes]] = []  # metadata only
        self._sum: list[np.ndarray] | None = None
        self._pending: list[_Pending] = []
        self._spill_root = spill_dir
        self._spill: Path | None = None
        self._lock = threading.Lock()
        self.fold_order: list[str] = []

    def drop(self) -> None:
        """One instruction ended without an answer that counts (a failure, a rejection)."""
        with self._lock:
            self._outstanding -= 1

    def add(self, proxy: ClientProxy, res: FitRes, arrays: list[np.ndarray]) -> None:
        """Fold one accepted answer (its ``arrays`` decoded and checked)."""
        n = res.num_examples
        with self._lock:
            self._outstanding -= 1
            self._answers.append((proxy, metadata_only(res)))
            if n > 0:
                bisect.insort(self._positive, n)
            name = sender_name(proxy, res)
            if n <= self._cap_floor():
                self._fold(arrays, n, name)
            else:
                self._pending.append(_Pending(name, n, self._write(arrays)))

    @property
    def waiting(self) -> int:
        """Answers on disk until the round's cap is known."""
        return len(self._pending)

    def _cap_floor(self) -> int:
        """The least the round's final cap can be, given the answers so far."""
        ones, counts = self._outstanding, self._positive
        size = ones + len(counts)
        if size == 0:
            return 0
        index = (size - 1) // 2  # statistics.median_low of the sorted counts with the ones
        low_median = 1 if index < ones else counts[index - ones]
        return max(1, math.floor(self.factor * low_median))

    def _fold(self, arrays: list[np.ndarray], weight: int, name: str) -> None:
        # The operations of flwr's aggregate(): layer * n, summed left to right.
        if self._sum is None:
            self._sum = [layer * weight for layer in arrays]
        else:
            if len(arrays) != len(self._sum):
                raise ValueError(f"{name} returned {len(arrays)} tensors, the others "
                                 f"{len(self._sum)}")
            for total, layer in zip(self._sum, arrays, strict=True):
                if layer.shape != total.shape:
                    raise ValueError(f"{name} returned a tensor of shape {layer.shape} where "
                                     f"the others have {total.shape}")
                np.add(total, layer * weight, out=total)
        self.fold_order.append(name)

    def _write(self, arrays: list[np.ndarray]) -> Path:
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="fedphd-running-sum-",
                                                dir=self._spill_root))
        path = self._spill / f"{len(self._pending)}.npz"
        np.savez(path, *arrays)
        return path

    def finish(self) -> tuple[list[tuple[ClientProxy, FitRes]], list[Clipped],
                              list[np.ndarray] | None]:
        """The accepted answers (metadata, sorted like the list path's, counts bounded), the
        clipped ones, and the weighted mean (None when no answer was accepted)."""
        try:
            return self._finish()
        finally:
            self.close()

    def _finish(self) -> tuple[list[tuple[ClientProxy, FitRes]], list[Clipped],
                               list[np.ndarray] | None]:
        answers = sorted(self._answers, key=answer_order)
        cap = examples_cap([res.num_examples for _, res in answers], self.factor)
        bounded, clipped = [], []
        for proxy, res in answers:
            if cap is not None and res.num_examples > cap:
                clipped.append(Clipped(sender_name(proxy, res), res.num_examples, cap))
                res = dataclasses.replace(res, num_examples=cap)
            bounded.append((proxy, res))
        for pending in self._pending:
            weight = pending.num_examples if cap is None else min(pending.num_examples, cap)
            with np.load(pending.path) as stored:
                self._fold([stored[f"arr_{i}"] for i in range(len(stored.files))], weight,
                           pending.sender)
        if self._sum is None:
            return bounded, clipped, None
        total = sum(res.num_examples for _, res in bounded)
        # In place where the result keeps the sum's dtype (the sum is this object's own):
        # the same division as ``layer / total``, without a second model-sized allocation.
        return bounded, clipped, [np.divide(layer, total, out=layer) if layer.dtype.kind == "f"
                                  else layer / total for layer in self._sum]

    def close(self) -> None:
        """Remove what was written to disk (also after a failed round)."""
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None


def weighted_mean_result(
    strategy: Strategy, arrays: list[np.ndarray],
    accepted: list[tuple[ClientProxy, FitRes]], failures: list,
) -> tuple[list[np.ndarray] | None, dict[str, Scalar]]:
    """What FedAvg's ``aggregate_fit`` returns for these answers, from their folded mean (the
    arrays themselves: the caller checks them before they become the model's message)."""
    if not getattr(strategy, "accept_failures", True) and failures:
        return None, {}
    metrics_fn = getattr(strategy, "fit_metrics_aggregation_fn", None)
    metrics = metrics_fn([(res.num_examples, res.metrics) for _, res in accepted]) \
        if metrics_fn else {}
    return arrays, metrics
