"""FedPhD's homogeneity, cloud weights, client-to-edge selection and pruning schedule."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from fedphd.common.core.models import build_unet, count_parameters, unet_config
from fedphd.common.core.pruning import PrunedUNet2DModel
from fedphd.common.settings.config import load_config
from fedphd.common.wire import codec
from fedphd.common.wire.keys import GROUP_LASSO_KEY
from fedphd.server.fedphd import (
    FedPhD,
    cloud_weights,
    keep_edges_filled,
    select_edges,
    statistical_homogeneity,
)
from fedphd.server.fedphd_pruning import PruningSchedule
from fedphd.server.methods import model_schedule
from fedphd.server.metrics_log import MetricsLog
from fedphd.server.schedule import FixedSchedule
from tests.test_strategy import FakeProxy

PAIRS = [[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]


def pair_hists(clients: int, size: int) -> dict[int, list[int]]:
    """FedPhD's CIFAR-10 split: client c holds classes PAIRS[c mod 5], size/2 of each."""
    hists = {}
    for c in range(clients):
        hist = [0] * 10
        for k in PAIRS[c % 5]:
            hist[k] = size // 2
        hists[c] = hist
    return hists


def test_sh_by_hand():
    assert statistical_homogeneity([5, 5, 5, 5]) == pytest.approx(2.0)
    # One class of four: p - u = (3/4, -1/4, -1/4, -1/4), norm = sqrt(12)/4.
    assert statistical_homogeneity([7, 0, 0, 0]) == pytest.approx(2 - math.sqrt(12) / 4)
    # Two classes of ten, as a FedPhD client: norm = sqrt(2 * 0.4^2 + 8 * 0.1^2).
    assert statistical_homogeneity(pair_hists(1, 10)[0]) == pytest.approx(
        2 - math.sqrt(2 * 0.16 + 8 * 0.01)
    )
    with pytest.raises(ValueError, match="empty"):
        statistical_homogeneity([0, 0])


def test_cloud_weights_by_hand():
    balanced, skewed = [10, 10], [20, 0]
    a, b = 100.0, -100.0
    raw = [30 + a * 2.0 + b, 20 + a * (2 - math.sqrt(0.5)) + b]
    weights = cloud_weights([30, 20], [balanced, skewed], a, b)
    assert weights == pytest.approx([raw[0] / sum(raw), raw[1] / sum(raw)])
    # max(0, .) clips a negative weight to zero.
    assert cloud_weights([1, 1], [balanced, skewed], 1.0, -2.3) == [1.0, 0.0]
    # All clipped: uniform rather than a division by zero.
    assert cloud_weights([1, 1], [balanced, skewed], 0.0, -5.0) == [0.5, 0.5]


def min_edge_sh(assignment: dict[int, str], hists, edges) -> float:
    per_edge = []
    for edge in edges:
        members = [hists[c] for c, e in assignment.items() if e == edge]
        per_edge.append(statistical_homogeneity(np.sum(members, axis=0)) if members else 0.0)
    return min(per_edge)


def test_selection_balances_label_distributions_across_edges():
    """Measured over 200 draws on the paper's split: FedPhD's rule leaves the worst edge
    more balanced than a uniformly random assignment does."""
    hists, edges = pair_hists(20, 2500), ["edge-a:1", "edge-b:2"]
    fedphd, greedy, random = [], [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        fedphd.append(min_edge_sh(select_edges(hists, edges, "fedphd", 1e4, rng), hists, edges))
        greedy.append(min_edge_sh(select_edges(hists, edges, "greedy", 1e4, rng), hists, edges))
        uniform = {c: edges[int(rng.integers(2))] for c in hists}
        random.append(min_edge_sh(uniform, hists, edges))
    assert np.mean(fedphd) > np.mean(random) + 0.01
    assert np.mean(greedy) > np.mean(random) + 0.01
    # Every client is placed exactly once, on a known edge.
    assignment = select_edges(hists, edges, "fedphd", 1e4, np.random.default_rng(0))
    assert sorted(assignment) == list(range(20)) and set(assignment.values()) <= set(edges)


def test_selection_is_reproducible_in_the_seed():
    hists, edges = pair_hists(10, 100), ["a", "b", "c"]
    first = select_edges(hists, edges, "fedphd", 500.0, np.random.default_rng(3))
    again = select_edges(hists, edges, "fedphd", 500.0, np.random.default_rng(3))
    assert first == again


def test_aggregation_weights_edges_by_homogeneity():
    strategy = FedPhD(sh_weight=100.0, sh_bias=0.0, selection="static")
    balanced = [np.full(3, 1.0, np.float32)]
    skewed = [np.full(3, 5.0, np.float32)]

    def answer(edge_id, arrays, hist):
        from fedphd.common.wire.transport import FitRes, ok_status

        metrics = {"edge_id": edge_id, "label_hist": json.dumps(hist)}
        return FakeProxy(str(edge_id)), FitRes(ok_status(), codec.encode(arrays, "fp32"),
                                               10, metrics)

    params, metrics = strategy.aggregate_fit(
        1, [answer(0, balanced, [5, 5]), answer(1, skewed, [10, 0])], []
    )
    w0, w1 = cloud_weights([10, 10], [[5, 5], [10, 0]], 100.0, 0.0)
    assert np.allclose(codec.decode(params)[0], w0 * 1.0 + w1 * 5.0)
    assert w0 > w1  # the balanced edge counts more, although both sent 10 samples
    assert json.loads(metrics["cloud_weights"]) == pytest.approx({"0": w0, "1": w1})


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_pruning_schedule_prunes_once_after_the_sparse_rounds(tmp_path):
    cfg = load_config(overrides=["pruning.enabled=true", "pruning.ratio=0.3",
                                 "pruning.sparse_rounds=2", "pruning.group_lasso=0.01"])
    schedule = model_schedule(cfg)
    assert isinstance(schedule, PruningSchedule)
    assert schedule.instruction_keys() == {GROUP_LASSO_KEY: 0.01}  # sparse training
    model = build_unet(unet_config(cfg.model), seed=0)
    asked = []

    def current():
        asked.append(True)
        return model

    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    # At the start and before the sparse rounds: no change, the model is not even decoded.
    assert all(schedule.before_round(r, current, metrics) is None for r in (0, 1, 2))
    assert not asked
    before = count_parameters(model)
    pruned = schedule.before_round(3, current, metrics)  # after the last group-lasso round
    assert isinstance(pruned, PrunedUNet2DModel) and count_parameters(pruned) < before
    assert schedule.instruction_keys() == {GROUP_LASSO_KEY: 0.0}
    assert schedule.before_round(3, current, metrics) is None  # once only
    metrics.close()
    [line] = _lines(tmp_path / "metrics.jsonl")
    assert line["tier"] == "pruning" and line["round"] == 2 and line["ratio"] == 0.3
    assert line["params_before"] == before and line["params_after"] == count_parameters(pruned)
    # A resumed run's schedule knows it pruned already.
    resumed = model_schedule(cfg)
    resumed.load_state(schedule.state())
    assert resumed.instruction_keys() == {GROUP_LASSO_KEY: 0.0}
    assert resumed.before_round(3, current, metrics) is None


def test_without_sparse_rounds_the_initial_model_is_pruned_at_the_start(tmp_path):
    cfg = load_config(overrides=["pruning.enabled=true", "pruning.group_lasso=0.01"])
    schedule = model_schedule(cfg)
    assert schedule.instruction_keys() == {GROUP_LASSO_KEY: 0.0}  # no sparse training
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    model = build_unet(unet_config(cfg.model), seed=0)
    assert schedule.before_round(0, lambda: model, metrics) is not None
    assert schedule.before_round(1, lambda: model, metrics) is None
    metrics.close()
    assert [line["round"] for line in _lines(tmp_path / "metrics.jsonl")] == [0]


def test_without_pruning_the_model_never_changes(tmp_path):
    schedule = model_schedule(load_config())
    assert isinstance(schedule, FixedSchedule)
    # FedPhD's group-lasso weight travels as 0 (off), as before schedules existed.
    assert schedule.instruction_keys() == {GROUP_LASSO_KEY: 0.0}
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    assert schedule.before_round(0, lambda: None, metrics) is None
    assert schedule.state() == {}
    schedule.load_state({"pruned": False})  # a version-1 checkpoint's flag: nothing to do
    metrics.close()
    assert _lines(tmp_path / "metrics.jsonl") == []


# --- never an empty edge ------------------------------------------------------------------

FEW_EDGES = ["e0", "e1", "e2"]


def edge_sizes(assignment: dict[int, str], edges) -> list[int]:
    return [sum(1 for e in assignment.values() if e == edge) for edge in edges]


def emptying_seeds(hists, edges, policy: str, scale: float) -> list[int]:
    """Seeds for which the old rule (no minimum) leaves an edge without clients."""
    return [seed for seed in range(40)
            if 0 in edge_sizes(select_edges(hists, edges, policy, scale,
                                            np.random.default_rng(seed), min_per_edge=0), edges)]


@pytest.mark.parametrize(("clients", "policy", "scale"), [
    (4, "fedphd", 720.0),  # the digits config's A: few clients per edge
    (6, "fedphd", 1e6),  # a large A: SH pulls complementary pairs together
    (6, "greedy", 1e6),  # the arg-max puts every client on one edge
])
def test_the_minimum_fills_every_edge_the_old_rule_empties(clients, policy, scale):
    hists = pair_hists(clients, 360)
    seeds = emptying_seeds(hists, FEW_EDGES, policy, scale)
    assert len(seeds) >= 10  # the topology really is one where the old rule empties edges
    for seed in seeds:
        old = select_edges(hists, FEW_EDGES, policy, scale, np.random.default_rng(seed),
                           min_per_edge=0)
        new = select_edges(hists, FEW_EDGES, policy, scale, np.random.default_rng(seed))
        assert min(edge_sizes(new, FEW_EDGES)) >= 1
        assert sorted(new) == list(range(clients))
        # The same draw, repaired by as few moves as edges lacked a client.
        assert sum(old[c] != new[c] for c in old) == edge_sizes(old, FEW_EDGES).count(0)
        again = select_edges(hists, FEW_EDGES, policy, scale, np.random.default_rng(seed))
        assert again == new  # deterministic in the seed


def test_a_larger_minimum_fills_level_by_level():
    hists = pair_hists(7, 360)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        assignment = select_edges(hists, FEW_EDGES, "greedy", 1e6, rng, min_per_edge=2)
        assert min(edge_sizes(assignment, FEW_EDGES)) >= 2


def test_the_cheapest_move_keeps_the_donor_homogeneous():
    """Edge e0 holds one client of classes {1, 6} and two of {0, 5}; e1 is empty. Moving a
    duplicate costs e0 no class, moving the {1, 6} client (the lowest id, which a plain
    tie-break would pick) leaves e0 with half its classes: the rule moves the duplicate
    with the lowest id."""
    one_six, zero_five = pair_hists(2, 100)[1], pair_hists(1, 100)[0]
    hists = {0: one_six, 1: zero_five, 2: zero_five}
    filled = keep_edges_filled({0: "e0", 1: "e0", 2: "e0"}, hists, ["e0", "e1"], 720.0, 1)
    assert filled == {0: "e0", 1: "e1", 2: "e0"}


def test_too_few_clients_fill_as_many_edges_as_possible(caplog):
    hists = pair_hists(2, 100)
    edges = ["e0", "e1", "e2", "e3"]
    with caplog.at_level(logging.WARNING, logger="fedphd.fedphd"):
        assignment = select_edges(hists, edges, "greedy", 1e6, np.random.default_rng(0))
    assert sorted(edge_sizes(assignment, edges)) == [0, 0, 1, 1]  # none doubled up
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["2 clients cannot give each of 4 live edges "
                        "topology.min_clients_per_edge = 1: filling as many edges as possible"]
    # Three clients, a minimum of 2 on 3 edges: every edge gets one before any gets two.
    three = select_edges(pair_hists(3, 100), FEW_EDGES, "greedy", 1e6,
                         np.random.default_rng(0), min_per_edge=2)
    assert edge_sizes(three, FEW_EDGES) == [1, 1, 1]


def test_fedphd_takes_the_minimum_from_the_run_config():
    from fedphd.common.federation.strategy import run_context
    from fedphd.common.federation.strategy_builder import build_strategy

    cfg = load_config(overrides=["topology.min_clients_per_edge=3"])
    strategy = build_strategy("fedphd.server.fedphd.FedPhD", {}, {}, "topology.cloud_strategy",
                              {**run_context(cfg, "{}"), "tensor_names": []})
    assert strategy.min_clients_per_edge == 3
    assert FedPhD().min_clients_per_edge == 1  # the config's default without a run config
    assert FedPhD(min_clients_per_edge=0).min_clients_per_edge == 0
