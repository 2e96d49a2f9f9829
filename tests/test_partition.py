"""Partitions over clients: disjoint, covering, deterministic, skewed as asked, clear errors."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedphd.common.data import partition as P
from fedphd.common.settings.config import ConfigError, PartitionConfig

NUM_CLASSES = 10
FEDPHD_PAIRS = [[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]


def make_labels(per_class: int = 100, num_classes: int = NUM_CLASSES, seed: int = 0) -> np.ndarray:
    """Balanced labels in a shuffled order, so no method can rely on sorted input."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


LABELS = make_labels()

# Every method through the public entry point, as a run configures it.
CONFIGS = {
    "iid": PartitionConfig(method="iid"),
    "dirichlet": PartitionConfig(method="dirichlet", alpha=0.3),
    "quantity": PartitionConfig(method="quantity", alpha=0.5),
    "classes": PartitionConfig(method="classes", classes_per_client=3),
    "pairs": PartitionConfig(method="classes", pairs=FEDPHD_PAIRS),
}


def label_distribution(labels: np.ndarray, part: np.ndarray) -> np.ndarray:
    counts = np.asarray(P.label_histogram(labels, part, NUM_CLASSES), dtype=float)
    return counts / counts.sum()


def mean_distance_from_uniform(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance of client label distributions from the (uniform) global."""
    uniform = np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
    distances = [0.5 * np.abs(label_distribution(labels, p) - uniform).sum() for p in parts]
    return float(np.mean(distances))


def assert_disjoint(parts: list[np.ndarray]) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a sample was given to two clients"


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("num_clients", [5, 12])
def test_partitions_are_disjoint_and_cover_the_data(method: str, num_clients: int) -> None:
    parts = P.partition(LABELS, num_clients, CONFIGS[method])

    assert len(parts) == num_clients
    assert all(part.dtype == np.int64 for part in parts)
    assert_disjoint(parts)
    # Every method here uses all classes (5 clients reach all 5 pairs), so all samples are used.
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_same_seed_same_partition_different_seed_different(method: str) -> None:
    cfg = CONFIGS[method]
    first = P.partition(LABELS, 8, cfg)
    again = P.partition(LABELS, 8, cfg)
    other = P.partition(LABELS, 8, cfg.model_copy(update={"seed": cfg.seed + 1}))

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_are_balanced_and_labels_mixed() -> None:
    labels = LABELS[:997]  # not divisible by the client count
    parts = P.iid(labels, 7, seed=3)

    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(labels)
    assert mean_distance_from_uniform(parts, labels) < 0.15


def test_smaller_alpha_gives_more_label_skew() -> None:
    def skew(alpha: float) -> float:
        return float(
            np.mean(
                [
                    mean_distance_from_uniform(P.dirichlet(LABELS, 8, alpha, seed, 2), LABELS)
                    for seed in range(5)
                ]
            )
        )

    skewed, near_iid = skew(0.1), skew(100.0)
    assert skewed > 0.5, skewed  # a few dominant classes per client
    assert near_iid < 0.1, near_iid
    assert skewed > near_iid + 0.4


def test_dirichlet_respects_min_samples() -> None:
    for seed in range(5):
        parts = P.dirichlet(LABELS, 20, alpha=0.1, seed=seed, min_samples=10)
        assert min(len(part) for part in parts) >= 10


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    # 10 clients, 4 samples each required from 40 samples at alpha=0.01: practically never met.
    labels = make_labels(per_class=4)
    with pytest.raises(ValueError, match=r"partition\.alpha.*partition\.min_samples"):
        P.dirichlet(labels, 10, alpha=0.01, seed=0, min_samples=4)


def test_quantity_skew_varies_sizes_but_keeps_labels_iid() -> None:
    labels = make_labels(per_class=500)
    parts = P.quantity_skew(labels, 5, alpha=0.5, seed=1, min_samples=20)

    sizes = np.array([len(part) for part in parts])
    assert sizes.min() >= 20
    assert sizes.max() > 2 * sizes.min(), sizes
    assert sizes.sum() == len(labels)
    for part in parts:
        if len(part) >= 300:  # smaller parts are too noisy to judge their label mix
            uniform = np.full(NUM_CLASSES, 1.0 / NUM_CLASSES)
            assert 0.5 * np.abs(label_distribution(labels, part) - uniform).sum() < 0.1


def test_quantity_skew_is_more_uneven_for_smaller_alpha() -> None:
    def spread(alpha: float) -> float:
        sizes = [len(p) for seed in range(5) for p in P.quantity_skew(LABELS, 5, alpha, seed, 2)]
        return float(np.std(sizes))

    assert spread(0.2) > 3 * spread(100.0)


@pytest.mark.parametrize(("num_clients", "k"), [(5, 2), (7, 3), (10, 1), (4, 10)])
def test_classes_per_client_gives_exactly_k_classes(num_clients: int, k: int) -> None:
    parts = P.classes_per_client(LABELS, num_clients, k, seed=0)

    for part in parts:
        assert len(np.unique(LABELS[part])) == k
    assert_disjoint(parts)
    assert sum(len(part) for part in parts) == len(LABELS)


def test_fixed_pairs_match_fedphd_layout() -> None:
    # CIFAR-10's training set: 5000 images per class, 20 clients over 5 pairs.
    labels = make_labels(per_class=5000)
    parts = P.fixed_pairs(labels, 20, FEDPHD_PAIRS, seed=0)

    for client, part in enumerate(parts):
        assert set(np.unique(labels[part])) == set(FEDPHD_PAIRS[client % 5])
        assert len(part) == 2500  # 10 000 images per pair / 4 clients, as in FedPhD
        # Both classes of the pair are shared out evenly, not just the total.
        assert sorted(np.bincount(labels[part]).tolist())[-2:] == [1250, 1250]
    assert_disjoint(parts)


def test_fixed_pairs_sizes_equal_within_a_pair_and_unused_pairs_left_out() -> None:
    labels = make_labels(per_class=101)
    parts = P.fixed_pairs(labels, 3, FEDPHD_PAIRS, seed=2)  # only pairs 0..2 are in use

    for client, part in enumerate(parts):
        assert set(np.unique(labels[part])) <= set(FEDPHD_PAIRS[client])
    used = np.concatenate(parts)
    assert_disjoint(parts)
    assert np.array_equal(np.sort(used), np.flatnonzero(np.isin(labels, [0, 5, 1, 6, 2, 7])))

    uneven = P.fixed_pairs(labels, 8, FEDPHD_PAIRS, seed=2)  # pairs 0..2 have 2 clients each
    for group in range(3):
        first, second = len(uneven[group]), len(uneven[group + 5])
        assert abs(first - second) <= 1


def test_label_histogram_sums_to_partition_size() -> None:
    parts = P.dirichlet(LABELS, 6, alpha=0.5, seed=0, min_samples=2)
    for part in parts:
        histogram = P.label_histogram(LABELS, part, NUM_CLASSES)
        assert len(histogram) == NUM_CLASSES
        assert sum(histogram) == len(part)
        assert histogram == [int((LABELS[part] == c).sum()) for c in range(NUM_CLASSES)]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: P.iid(LABELS[:5], 6, 0), "topology.clients"),
        (lambda: P.iid(LABELS, 0, 0), "topology.clients"),
        (lambda: P.dirichlet(LABELS, 4, 0.0, 0, 2), "partition.alpha"),
        (lambda: P.quantity_skew(LABELS, 4, -1.0, 0, 2), "partition.alpha"),
        (lambda: P.quantity_skew(LABELS[:10], 4, 0.5, 0, 3), "partition.min_samples"),
        (lambda: P.classes_per_client(LABELS, 5, 11, 0), "partition.classes_per_client"),
        (lambda: P.classes_per_client(LABELS, 2, 3, 0), "partition.classes_per_client"),
        (lambda: P.fixed_pairs(LABELS, 5, [[0, 5], [1, 12]], 0), "partition.pairs"),
        (lambda: P.fixed_pairs(LABELS, 5, [[0, 5], [5, 6]], 0), "partition.pairs"),
        (lambda: P.fixed_pairs(LABELS, 5, [[0, 0]], 0), "partition.pairs"),
        (lambda: P.fixed_pairs(LABELS, 5, [], 0), "partition.pairs"),
    ],
)
def test_impossible_requests_name_the_field(call: Callable[[], object], field: str) -> None:
    # A ConfigError: the command line prints it as one line instead of a traceback.
    with pytest.raises(P.PartitionError, match=field.replace(".", r"\.")) as caught:
        call()
    assert isinstance(caught.value, ConfigError)


def test_partition_dispatches_pairs_and_k() -> None:
    with_pairs = P.partition(LABELS, 5, PartitionConfig(method="classes", pairs=FEDPHD_PAIRS))
    assert [set(np.unique(LABELS[p])) for p in with_pairs] == [set(g) for g in FEDPHD_PAIRS]

    shards = P.partition(LABELS, 5, PartitionConfig(method="classes", classes_per_client=4))
    assert [len(np.unique(LABELS[p])) for p in shards] == [4] * 5


def test_a_run_whose_partition_cannot_be_made_is_refused_up_front() -> None:
    from fedphd.common.settings.config import load_config

    P.check_run_partition(load_config(None, []))  # the default run: 4 clients, IID digits
    infeasible = load_config(None, ['partition.method="classes"',
                                    "partition.classes_per_client=11"])
    with pytest.raises(P.PartitionError, match=r"partition\.classes_per_client=11"):
        P.check_run_partition(infeasible)
