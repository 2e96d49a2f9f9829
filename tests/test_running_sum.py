"""Weighted means folded as the answers arrive give the list path's model (running_mean.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.server.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg
from flwr.server.strategy.aggregate import aggregate

from fedphd.common.federation import rounds
from fedphd.common.federation.rounds import fit_and_fold, run_fit_round
from fedphd.common.federation.running_mean import ListFedAvg, RunningMean
from fedphd.common.federation.strategy import ManagedStrategy
from fedphd.common.wire import codec
from fedphd.common.wire.keys import ARCH_KEY
from fedphd.common.wire.transport import (
    ClientProxy,
    FitRes,
    Server,
    SimpleClientManager,
    Status,
    TrafficMeter,
    ndarrays_to_parameters,
    ok_status,
)
from fedphd.server.moon import MOON
from tests.conftest import fedphd, port_overrides

SHAPES = [(3, 4), (5,), (2, 2, 2)]
MODEL = [np.zeros(shape, np.float32) for shape in SHAPES]


class AnsweringProxy(ClientProxy):
    """A connected client whose ``fit`` returns a prepared answer (or raises)."""

    def __init__(self, cid: str, answer: FitRes | None, delay: float = 0.0):
        super().__init__(cid)
        self.answer, self.delay = answer, delay

    def fit(self, ins, timeout, group_id):
        time.sleep(self.delay)
        if self.answer is None:
            raise ConnectionError("connection lost")
        return self.answer

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def fit_answer(cid: int, arrays, examples: int) -> FitRes:
    metrics = {"client_id": cid, "loss": 0.1 * cid, "label_hist": json.dumps([examples])}
    return FitRes(ok_status(), codec.encode(arrays, "fp32"), examples, metrics)


class Recorder:
    """A ``fit_metrics_aggregation_fn`` that keeps what it was given."""

    def __init__(self):
        self.calls: list[list[tuple[int, dict]]] = []

    def __call__(self, metrics):
        self.calls.append([(n, dict(m)) for n, m in metrics])
        return {"answers": len(metrics)}


def round_setup(counts: dict[int, int | None], inner=None, bad: tuple[int, ...] = ()):
    """A configured round: client k answers ``weights(k)`` with ``counts[k]`` samples (None:
    its connection fails; in ``bad``: a NaN tensor). Instructions in client order."""
    recorder = Recorder()
    inner = inner or FedAvg(min_available_clients=1, min_fit_clients=1,
                            fit_metrics_aggregation_fn=recorder)
    strategy = ManagedStrategy(inner, {ARCH_KEY: "{}"})
    manager = SimpleClientManager()
    sent: dict[int, list[np.ndarray]] = {}
    for cid, examples in counts.items():
        arrays = weights(cid)
        if cid in bad:
            arrays[1][0] = np.nan
        sent[cid] = arrays
        answer = None if examples is None else fit_answer(cid, arrays, examples)
        manager.register(AnsweringProxy(str(cid), answer))
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(MODEL), manager)
    instructions.sort(key=lambda pair: int(pair[0].cid))
    return strategy, instructions, sent, recorder


def list_path(strategy, instructions):
    """Today's path: Flower's fit_clients, then aggregate_round over the whole list."""
    results, failures = rounds.fit_clients(instructions, max_workers=1, timeout=None,
                                           group_id=1)
    return strategy.aggregate_round(1, results, failures)


def keep_running_means(strategy) -> list[RunningMean]:
    made: list[RunningMean] = []
    original = strategy.new_running_mean

    def new_running_mean(expected):
        made.append(original(expected))
        return made[-1]

    strategy.new_running_mean = new_running_mean
    return made


def bit_equal(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    return all(a.dtype == b.dtype and a.tobytes() == b.tobytes()
               for a, b in zip(first, second, strict=True)) and len(first) == len(second)


MIXED = {0: 30, 1: 40, 2: 5000, 3: 50, 4: 60, 5: 45, 6: None}  # 2 is clipped, 6 fails


def test_running_sum_is_flowers_aggregate_bit_for_bit_with_clipping_rejection_failure():
    strategy, instructions, sent, _ = round_setup(MIXED, bad=(5,))
    made = keep_running_means(strategy)
    result = fit_and_fold(strategy, instructions, max_workers=1, timeout=None, server_round=1)
    folded = made[0]
    # Early answers may still be clipped (their cap is not known yet): they waited on disk.
    assert folded.fold_order[-1] == "client 2" and set(folded.fold_order) == {
        f"client {k}" for k in (0, 1, 2, 3, 4)}
    cap = 10 * 50  # 10 x the low median of the accepted counts 30, 40, 50, 60, 5000
    expected = aggregate([(sent[int(name.split()[1])], min(MIXED[int(name.split()[1])], cap))
                          for name in folded.fold_order])
    assert bit_equal(codec.decode(result.parameters), expected)
    assert result.summary.clipped == {"client 2": {"claimed": 5000, "counted": cap}}
    assert "NaN" in result.summary.rejected["client 5"]
    assert result.summary.failures == 2
    assert folded._spill is None and folded.waiting > 0  # written, then removed


def test_answers_that_cannot_be_clipped_fold_at_once_bit_identical_to_the_list_path():
    # 10 samples or fewer: never above the cap's floor (10 x 1), so nothing waits on disk.
    counts = {k: 3 + k for k in range(6)}
    strategy, instructions, _, _ = round_setup(counts, inner=FedAvg(inplace=False))
    listed = list_path(strategy, instructions)
    strategy, instructions, _, _ = round_setup(counts, inner=FedAvg(inplace=False))
    made = keep_running_means(strategy)
    folded = fit_and_fold(strategy, instructions, max_workers=1, timeout=None, server_round=1)
    assert made[0].waiting == 0
    assert bit_equal(codec.decode(folded.parameters), codec.decode(listed.parameters))


def test_same_model_records_and_metrics_as_the_list_path_in_any_arrival_order():
    strategy, instructions, _, listed_metrics = round_setup(MIXED, bad=(5,))
    listed = list_path(strategy, instructions)  # FedAvg's default: aggregate_inplace
    strategy, instructions, _, folded_metrics = round_setup(MIXED, bad=(5,))
    for proxy, _ in instructions:  # completion order unlike the list's sorted order
        proxy.delay = 0.02 * (7 - int(proxy.cid))
    folded = fit_and_fold(strategy, instructions, max_workers=8, timeout=None, server_round=1)
    for a, b in zip(codec.decode(folded.parameters), codec.decode(listed.parameters),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for field in ("num_examples", "loss", "label_hist", "senders", "examples", "clipped",
                  "rejected", "failures", "metrics"):
        assert getattr(folded.summary, field) == getattr(listed.summary, field), field
    # FedAvg's fit_metrics_aggregation_fn still gets every (n, metrics), bounded n.
    assert folded_metrics.calls == listed_metrics.calls
    assert [n for n, _ in folded_metrics.calls[0]] == [30, 40, 500, 50, 60]
    assert folded.metrics == listed.metrics == {"answers": 5}


class DeclaredMean(FedMedian):
    """A strategy that declares its aggregate a weighted mean (the protocol's attribute)."""

    running_sum = True


@pytest.mark.parametrize(("inner", "folds"), [
    (FedAvg(), True), (FedProx(proximal_mu=0.1), True), (MOON(), True),
    (DeclaredMean(), True), (ListFedAvg(), False), (FedMedian(), False),
    (FedTrimmedAvg(), False),
    (FedAdam(initial_parameters=ndarrays_to_parameters(MODEL)), False),
])
def test_only_weighted_means_fold(inner, folds):
    strategy, _, _, _ = round_setup({0: 5, 1: 6}, inner=inner)
    assert strategy.folds_answers() is folds


def test_a_strategy_that_is_not_a_weighted_mean_gets_the_list(monkeypatch):
    calls = []
    original = ManagedStrategy.aggregate_round

    def recording(self, server_round, results, failures):
        calls.append(len(results))
        return original(self, server_round, results, failures)

    monkeypatch.setattr(ManagedStrategy, "aggregate_round", recording)
    outcomes = {}
    for name, inner in (("median", FedMedian(min_available_clients=1, min_fit_clients=1)),
                        ("mean", FedAvg(min_available_clients=1, min_fit_clients=1))):
        strategy, _, sent, _ = round_setup({0: 5, 1: 6, 2: 7}, inner=inner)
        server = Server(client_manager=strategy_manager(sent), strategy=strategy)
        server.parameters = ndarrays_to_parameters(MODEL)
        outcomes[name] = run_fit_round(server, strategy, TrafficMeter(), 1, timeout=10)
    assert outcomes["median"].aggregation == "list" and calls == [3]
    assert outcomes["mean"].aggregation == "running_sum" and calls == [3]


def strategy_manager(sent: dict[int, list[np.ndarray]]) -> SimpleClientManager:
    manager = SimpleClientManager()
    for cid, arrays in sent.items():
        manager.register(AnsweringProxy(str(cid), fit_answer(cid, arrays, 5 + cid)))
    return manager


def test_an_error_answer_is_a_failure_as_in_flowers_fit_clients():
    strategy, instructions, _, _ = round_setup({0: 5, 1: 6})
    instructions[1][0].answer = FitRes(Status(code=1, message="out of memory"),
                                       ndarrays_to_parameters([]), 0, {})
    result = fit_and_fold(strategy, instructions, max_workers=2, timeout=None, server_round=1)
    assert result.summary.senders == ["client 0"] and result.summary.failures == 1


@pytest.mark.slow
def test_a_real_run_folds_at_the_edge_and_the_cloud(tmp_path: Path, ports):
    out = tmp_path / "run"
    result = fedphd("launch", "--out", str(out), "--timeout", "300",
                    "--set", "topology.edges=1", "--set", "topology.clients=2",
                    "--set", "topology.cloud_rounds=1", "--set", "topology.edge_rounds=1",
                    "--set", "training.local_steps=1", "--set", "diffusion.sampling_steps=1",
                    "--set", "output.grid_samples=1", "--set", "evaluation.final=false",
                    "--set", "evaluation.every_cloud_rounds=0",
                    *port_overrides(ports), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    edge = [r for r in records if r["tier"] == "edge"]
    cloud = [r for r in records if r["tier"] == "cloud"]
    assert edge and all(r["aggregation"] == "running_sum" and len(r["clients"]) == 2
                        for r in edge)
    assert cloud and cloud[0]["aggregation"] == "running_sum" and cloud[0]["model_updated"]
