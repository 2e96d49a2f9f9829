"""Split a labelled training set over clients: IID, label skew, quantity skew or class shards.

Every function takes the label array only (never the images) and returns one sorted array of
sample indices per client. Partitions are disjoint and deterministic in ``seed``; every client
process computes the same split independently, so no index lists travel over the network.
Impossible requests raise ``PartitionError`` (a ``ConfigError``, so every role prints its one
line and exits instead of a traceback) naming the configuration field to change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedphd.common.settings.config import ConfigError, PartitionConfig, RunConfig

MAX_DIRICHLET_DRAWS = 100  # enough for any sane alpha; beyond it the request is unrealistic


class PartitionError(ConfigError):
    """The configured partition cannot be made from this data set; the message names the
    fields to change. A ``ConfigError``: the command line reports it in one line."""


def _as_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {array.dtype} {array.shape}")
    if array.size and array.min() < 0:
        raise ValueError("labels must be non-negative class ids")
    return array.astype(np.int64, copy=False)


def _check_clients(labels: np.ndarray, num_clients: int, per_client: int = 1) -> None:
    if num_clients < 1:
        raise PartitionError(f"topology.clients must be at least 1, got {num_clients}")
    if num_clients * per_client > len(labels):
        minimum = "" if per_client == 1 else f" (partition.min_samples={per_client} each)"
        raise PartitionError(
            f"topology.clients={num_clients} needs at least {num_clients * per_client} samples"
            f"{minimum} but the data set has {len(labels)}"
        )


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise PartitionError(f"partition.alpha must be positive, got {alpha}")


def _sorted(parts: list[np.ndarray]) -> list[np.ndarray]:
    # Sorted indices make partitions easy to compare and read; loaders shuffle anyway.
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle all samples and cut them into ``num_clients`` parts whose sizes differ by <= 1."""
    labels = _as_labels(labels)
    _check_clients(labels, num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return _sorted(np.array_split(order, num_clients))


def _dirichlet_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One draw of label skew: each class is cut over clients by proportions ~ Dir(alpha)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.concatenate(chunks) for chunks in parts]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_samples: int = 1
) -> list[np.ndarray]:
    """Label skew (Hsu et al., 2019): class ``k`` is spread over clients by p_k ~ Dir(alpha).

    Small ``alpha`` gives each client few dominant classes; large ``alpha`` approaches IID.
    Draws are repeated (at most ``MAX_DIRICHLET_DRAWS`` times) until every client holds at least
    ``min_samples`` samples.
    """
    labels = _as_labels(labels)
    _check_alpha(alpha)
    _check_clients(labels, num_clients, min_samples)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(labels, num_clients, alpha, rng)
        if min(len(part) for part in parts) >= min_samples:
            return _sorted(parts)
    raise PartitionError(
        f"partition.alpha={alpha} left some of the {num_clients} clients with fewer than "
        f"partition.min_samples={min_samples} samples in {MAX_DIRICHLET_DRAWS} draws; raise "
        "partition.alpha, lower partition.min_samples or use fewer topology.clients"
    )


def _skewed_sizes(
    total: int, num_clients: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Client sizes: ``min_samples`` each, the rest shared by Dir(alpha) proportions."""
    spare = total - num_clients * min_samples
    shares = rng.dirichlet(np.full(num_clients, alpha)) * spare
    extra = np.floor(shares).astype(np.int64)
    # Largest remainders get the samples rounding lost, so sizes add up to ``total`` exactly.
    leftover = spare - int(extra.sum())
    extra[np.argsort(extra - shares, kind="stable")[:leftover]] += 1
    return extra + min_samples


def quantity_skew(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_samples: int = 1
) -> list[np.ndarray]:
    """Quantity skew: client sizes follow Dir(alpha) proportions, labels are IID within clients.

    Every client first gets ``min_samples`` samples and the remainder is shared by the Dirichlet
    proportions, so no redraws are needed and the request never fails when it is feasible.
    """
    labels = _as_labels(labels)
    _check_alpha(alpha)
    _check_clients(labels, num_clients, min_samples)
    rng = np.random.default_rng(seed)
    sizes = _skewed_sizes(len(labels), num_clients, alpha, min_samples, rng)
    order = rng.permutation(len(labels))
    return _sorted(np.split(order, np.cumsum(sizes)[:-1]))


def _assign_classes(
    classes: np.ndarray, num_clients: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each client ``k`` distinct classes, using every class as evenly as possible.

    Each client takes the ``k`` least-used classes so far (ties broken at random), which keeps
    usage counts within one of each other, so all classes are used once there are enough slots.
    """
    usage = np.zeros(len(classes), dtype=np.int64)
    chosen = []
    for _ in range(num_clients):
        picks = np.lexsort((rng.random(len(classes)), usage))[:k]
        usage[picks] += 1
        chosen.append(classes[picks])
    return chosen


def classes_per_client(labels: np.ndarray, num_clients: int, k: int, seed: int) -> list[np.ndarray]:
    """Pathological non-IID shards: each client holds ``k`` distinct classes.

    Each class's samples are shuffled and cut into equal shards, one per client holding that
    class. A class with fewer samples than holders leaves some holders without it, the only case
    in which a client ends up with fewer than ``k`` classes.
    """
    labels = _as_labels(labels)
    _check_clients(labels, num_clients)
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise PartitionError(
            f"partition.classes_per_client={k} must be between 1 and the {len(classes)} "
            "classes of the data set"
        )
    if num_clients * k < len(classes):
        raise PartitionError(
            f"topology.clients={num_clients} x partition.classes_per_client={k} leaves some of "
            f"the {len(classes)} classes without a client; raise either"
        )
    rng = np.random.default_rng(seed)
    held = _assign_classes(classes, num_clients, k, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in classes:
        holders = [client for client in range(num_clients) if label in held[client]]
        members = rng.permutation(np.flatnonzero(labels == label))
        for client, shard in zip(holders, np.array_split(members, len(holders)), strict=True):
            parts[client].append(shard)
    return _sorted([np.concatenate(chunks) for chunks in parts])


def _check_pairs(labels: np.ndarray, pairs: Sequence[Sequence[int]]) -> None:
    if not pairs or any(len(group) == 0 for group in pairs):
        raise PartitionError("partition.pairs must be a non-empty list of non-empty class groups")
    flat = [int(label) for group in pairs for label in group]
    duplicates = sorted({label for label in flat if flat.count(label) > 1})
    if duplicates:
        raise PartitionError(f"partition.pairs lists classes {duplicates} more than once")
    present = set(np.unique(labels).tolist())
    unknown = sorted(set(flat) - present)
    if unknown:
        raise PartitionError(
            f"partition.pairs names classes {unknown} that the data set does not have "
            f"(it has {sorted(present)})"
        )


def fixed_pairs(
    labels: np.ndarray, num_clients: int, pairs: Sequence[Sequence[int]], seed: int
) -> list[np.ndarray]:
    """FedPhD's fixed class groups: client ``c`` gets group ``c % len(pairs)``.

    The clients sharing a group split its images evenly and disjointly, with each class spread
    evenly over them (e.g. CIFAR-10, 20 clients, 5 pairs: 4 clients x 2500 images per pair).
    Groups with no client (fewer clients than groups) are left out.
    """
    labels = _as_labels(labels)
    _check_clients(labels, num_clients)
    _check_pairs(labels, pairs)
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for group_id, group in enumerate(pairs):
        sharers = list(range(group_id, num_clients, len(pairs)))
        if not sharers:
            continue
        if len(sharers) > int(np.isin(labels, group).sum()):
            raise PartitionError(
                f"partition.pairs group {list(group)} has fewer images than the "
                f"{len(sharers)} clients that share it; use fewer topology.clients"
            )
        # Class blocks in a row, each shuffled; dealing them out round-robin gives every sharer
        # the same size (+-1) and the same class mix (+-1 per class).
        dealt = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in group])
        for position, client in enumerate(sharers):
            parts[client] = dealt[position :: len(sharers)]
    return _sorted(parts)


def partition(labels: np.ndarray, num_clients: int, cfg: PartitionConfig) -> list[np.ndarray]:
    """Split ``labels`` over ``num_clients`` clients as ``cfg`` (``[partition]``) asks."""
    if cfg.method == "iid":
        return iid(labels, num_clients, cfg.seed)
    if cfg.method == "dirichlet":
        return dirichlet(labels, num_clients, cfg.alpha, cfg.seed, cfg.min_samples)
    if cfg.method == "quantity":
        return quantity_skew(labels, num_clients, cfg.alpha, cfg.seed, cfg.min_samples)
    if cfg.method == "classes":
        if cfg.pairs is not None:
            return fixed_pairs(labels, num_clients, cfg.pairs, cfg.seed)
        return classes_per_client(labels, num_clients, cfg.classes_per_client, cfg.seed)
    raise PartitionError(f"partition.method {cfg.method!r} is not supported")


def check_run_partition(cfg: RunConfig) -> None:
    """Raise ``PartitionError`` now if the run's partition cannot be made, so a command that
    starts the clients (``fedphd launch``) refuses in one line before starting processes that
    would each fail with it. Reads the labels only (an ``imagefolder`` is decoded once)."""
    from fedphd.common.core.models import unet_config
    from fedphd.common.data.datasets import load_dataset  # torch and torchvision: on use only

    arch = unet_config(cfg.model)
    images = load_dataset(cfg.data, arch["sample_size"], arch["in_channels"])
    partition(images.labels, cfg.topology.clients, cfg.partition)


def label_histogram(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """How many of the samples at ``indices`` carry each of the ``num_classes`` labels."""
    chosen = _as_labels(labels)[np.asarray(indices, dtype=np.int64)]
    if chosen.size and chosen.max() >= num_classes:
        raise ValueError(f"label {int(chosen.max())} is not below num_classes={num_classes}")
    return np.bincount(chosen, minlength=num_classes).tolist()
