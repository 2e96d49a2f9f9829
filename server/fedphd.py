"""FedPhD's cloud strategy: homogeneity-aware aggregation and client-to-edge selection.

Statistical homogeneity of a label distribution ``p`` over ``C`` classes, ``u`` uniform::

    SH(p) = 2 - ||p - u||_2            in [2 - sqrt(1 - 1/C), 2]; higher = more balanced

Cloud aggregation of the edge models ``w_e``::

    alpha_e = max(0, n_e + a * SH(p_e) + b),   w = sum_e alpha_e w_e / sum_e alpha_e

with ``n_e`` the samples of edge e's latest round and ``p_e`` its label distribution
accumulated over the cloud period (reset after every cloud aggregation, because each edge
reports the statistics of the period that just ended).

Client-to-edge selection: client k with label histogram ``h_k`` joins edge e with probability::

    P(e | k) ∝ max(0, A * SH(normalise(H_e + h_k)) - n_e) + 1e-8

where ``H_e``/``n_e`` are edge e's label counts/samples. The reference lets every client pick an
edge every round; a deployed client cannot hop edges every round, so the rule is applied
when clients are (re)assigned at cloud-round boundaries, clients taking their turn in a
seeded random order and each decision seeing the clients placed before it. ``greedy`` takes
the arg-max instead of sampling; ``static`` keeps the start-up assignment.

No empty edge: the draw alone can leave a live edge without clients (with few clients per
edge, or a large ``A``, the ``SH`` term pulls complementary clients together), and such an
edge would have nothing to train. After the draw, clients move from edges holding more than
``m = topology.min_clients_per_edge`` to edges holding fewer (see :func:`keep_edges_filled`),
each move the one that costs the draw's objective least.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from fedphd.common.federation.strategy import add_to_config
from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.keys import (
    ADDRESS_PROPERTY,
    ASSIGNMENT_KEY,
    CLIENT_ID_METRIC,
    EDGE_CLIENTS_PROPERTY,
    EDGE_ID_METRIC,
    LABEL_HIST_METRIC,
)
from fedphd.common.wire.transport import (
    ClientManager,
    ClientProxy,
    FedAvg,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    aggregate,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

log = logging.getLogger("fedphd.fedphd")

SelectionPolicy = Literal["fedphd", "greedy", "static"]


def statistical_homogeneity(counts: Sequence[float]) -> float:
    """``SH(p) = 2 - ||p - u||_2`` of the distribution with these class counts."""
    hist = np.asarray(counts, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        raise ValueError("statistical homogeneity of an empty label histogram")
    p = hist / total
    return float(2.0 - np.linalg.norm(p - 1.0 / len(p)))


def cloud_weights(
    samples: Sequence[int], histograms: Sequence[Sequence[float]], a: float, b: float
) -> list[float]:
    """Normalised ``max(0, n_e + a SH(p_e) + b)``; uniform if every weight is clipped to 0."""
    raw = [
        max(0.0, n + a * statistical_homogeneity(h) + b)
        for n, h in zip(samples, histograms, strict=True)
    ]
    total = sum(raw)
    if total <= 0:
        return [1.0 / len(raw)] * len(raw)
    return [w / total for w in raw]


def select_edges(
    client_hists: Mapping[int, Sequence[int]],
    edges: Sequence[str],
    policy: SelectionPolicy,
    scale: float,
    rng: np.random.Generator,
    min_per_edge: int = 1,
) -> dict[int, str]:
    """Assign every client to an edge with FedPhD's rule (see the module docstring), then
    keep at least ``min_per_edge`` clients on every edge (:func:`keep_edges_filled`)."""
    if not edges:
        raise ValueError("no edge to assign clients to")
    num_classes = max(len(h) for h in client_hists.values())
    counts = {e: np.zeros(num_classes) for e in edges}
    samples = dict.fromkeys(edges, 0.0)
    assignment: dict[int, str] = {}
    for client in rng.permutation(sorted(client_hists)):
        hist = np.zeros(num_classes)
        hist[: len(client_hists[client])] = client_hists[client]
        scores = np.array([
            max(0.0, scale * statistical_homogeneity(counts[e] + hist) - samples[e]) + 1e-8
            for e in edges
        ])
        if policy == "greedy":
            choice = edges[int(np.argmax(scores))]
        else:
            choice = edges[int(rng.choice(len(edges), p=scores / scores.sum()))]
        assignment[int(client)] = choice
        counts[choice] += hist
        samples[choice] += hist.sum()
    return keep_edges_filled(assignment, client_hists, edges, scale, min_per_edge)


def keep_edges_filled(
    assignment: Mapping[int, str],
    client_hists: Mapping[int, Sequence[int]],
    edges: Sequence[str],
    scale: float,
    minimum: int,
) -> dict[int, str]:
    """``assignment`` with at least ``minimum`` clients on every edge, by the cheapest moves.

    The objective the draw pursues, summed over the edges, is
    ``J = sum_e (A * SH(H_e) - n_e)``, with ``SH(empty) = 0`` (an empty edge contributes
    nothing). A move keeps ``sum_e n_e`` fixed, so moving client k (histogram ``h_k``) from
    edge d to edge r costs only homogeneity::

        cost(k, d -> r) = A * (SH(H_d) - SH(H_d - h_k)) + A * (SH(H_r) - SH(H_r + h_k))

    (what d loses without k, minus what r gains with it). Each step makes the cheapest move,
    ties broken by the lowest client id, then the first receiver in ``edges``, from an edge
    holding more than the level being filled to one holding fewer. Levels fill in turn
    (every edge gets 1 client, then 2, ... up to ``minimum``), so with fewer clients than
    ``len(edges) * minimum`` as many edges as possible get clients (that shortfall is logged
    once), and no client moves twice: a receiver never holds more than the level it is
    filled to, so it never donates. No randomness beyond the draw that produced
    ``assignment``: the same seed gives the same result.
    """
    placed = dict(assignment)
    if len(placed) < len(edges) * minimum:
        log.warning("%d clients cannot give each of %d live edges topology.min_clients_per_edge "
                    "= %d: filling as many edges as possible", len(placed), len(edges), minimum)
    num_classes = max((len(h) for h in client_hists.values()), default=0)
    hists = {c: np.pad(np.asarray(h, np.float64), (0, num_classes - len(h)))
             for c, h in client_hists.items()}
    for level in range(1, minimum + 1):
        while (move := _cheapest_move(placed, hists, edges, scale, level)) is not None:
            client, receiver = move
            log.info("client %d moves from %s to %s, which held fewer than %d (of "
                     "topology.min_clients_per_edge = %d)", client, placed[client], receiver,
                     level, minimum)
            placed[client] = receiver
    return placed


def _homogeneity(counts: np.ndarray) -> float:
    """``SH`` of an edge's label counts; 0 for an edge without samples (it adds nothing)."""
    return statistical_homogeneity(counts) if counts.sum() > 0 else 0.0


def _cheapest_move(
    placed: Mapping[int, str], hists: Mapping[int, np.ndarray], edges: Sequence[str],
    scale: float, level: int,
) -> tuple[int, str] | None:
    """``(client, receiver)`` of the cheapest move (see :func:`keep_edges_filled`) from an
    edge holding more than ``level`` clients to one holding fewer (None: no such pair)."""
    members = {e: sorted(c for c, at in placed.items() if at == e) for e in edges}
    receivers = [e for e in edges if len(members[e]) < level]
    donors = [e for e in edges if len(members[e]) > level]
    if not receivers or not donors:
        return None
    empty = np.zeros_like(next(iter(hists.values())))
    totals = {e: sum((hists[c] for c in members[e]), empty) for e in edges}
    candidates = []
    for donor in donors:
        for client in members[donor]:
            lost = _homogeneity(totals[donor]) - _homogeneity(totals[donor] - hists[client])
            for receiver in receivers:
                gained = (_homogeneity(totals[receiver] + hists[client])
                          - _homogeneity(totals[receiver]))
                candidates.append((scale * (lost - gained), client, edges.index(receiver)))
    _, client, receiver_index = min(candidates)
    return client, edges[receiver_index]


class FedPhD(FedAvg):
    """FedPhD at the cloud: SH-weighted aggregation of edges, SH-driven client selection.

    Parameters beyond ``FedAvg``'s: ``sh_weight`` (a), ``sh_bias`` (b), ``selection``
    (``fedphd``, ``greedy`` or ``static``), ``selection_scale`` (A), ``selection_seed``,
    ``properties_timeout`` (seconds to wait for an edge's client statistics) and
    ``min_clients_per_edge`` (default: the run's ``topology.min_clients_per_edge``, which the
    driver passes in ``run_config``; 1 without one).
    """

    def __init__(
        self,
        *,
        sh_weight: float = 50_000.0,
        sh_bias: float = 0.0,
        selection: SelectionPolicy = "fedphd",
        selection_scale: float = 10_000.0,
        selection_seed: int = 0,
        properties_timeout: float = 120.0,
        min_clients_per_edge: int | None = None,
        run_config: RunConfig | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if selection not in ("fedphd", "greedy", "static"):
            raise ValueError(f"selection must be fedphd, greedy or static, got {selection!r}")
        self.sh_weight = sh_weight
        self.sh_bias = sh_bias
        self.selection = selection
        self.selection_scale = selection_scale
        self.selection_seed = selection_seed
        self.properties_timeout = properties_timeout
        if min_clients_per_edge is None:
            min_clients_per_edge = (run_config.topology.min_clients_per_edge
                                    if run_config is not None else 1)
        if min_clients_per_edge < 0:
            raise ValueError(f"min_clients_per_edge must be >= 0, got {min_clients_per_edge}")
        self.min_clients_per_edge = min_clients_per_edge
        self.assignment: dict[int, str] = {}

    def __repr__(self) -> str:
        return f"FedPhD(a={self.sh_weight}, b={self.sh_bias}, selection={self.selection})"

    def edge_statistics(self, proxies: Sequence[ClientProxy]) -> tuple[list[str], dict]:
        """Ask each edge for its address and its clients' label histograms."""
        addresses, hists = [], {}
        for proxy in proxies:
            try:
                props = proxy.get_properties(
                    GetPropertiesIns(config={}), timeout=self.properties_timeout, group_id=None
                ).properties
            except Exception as error:  # noqa: BLE001 - a lost edge must not stop the run
                log.warning("no statistics from peer %s: %r", proxy.cid, error)
                continue
            if ADDRESS_PROPERTY not in props:
                continue  # a plain client (flat mode): nothing to assign
            addresses.append(str(props[ADDRESS_PROPERTY]))
            clients = json.loads(str(props[EDGE_CLIENTS_PROPERTY]))
            hists.update({int(c): h for c, h in clients.items()})
        return addresses, hists

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if self.selection == "static" or not instructions:
            return instructions
        edges, hists = self.edge_statistics([proxy for proxy, _ in instructions])
        if len(edges) < 2 or not hists:
            return instructions
        rng = np.random.default_rng([self.selection_seed, server_round])
        self.assignment = select_edges(
            hists, sorted(edges), self.selection, self.selection_scale, rng,
            self.min_clients_per_edge,
        )
        mapping = json.dumps({str(c): e for c, e in sorted(self.assignment.items())})
        log.info("round %d: client assignment %s", server_round, mapping)
        return add_to_config(instructions, {ASSIGNMENT_KEY: mapping})

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        hists = [json.loads(str(res.metrics[LABEL_HIST_METRIC])) for _, res in results]
        samples = [res.num_examples for _, res in results]
        weights = cloud_weights(samples, hists, self.sh_weight, self.sh_bias)
        merged = aggregate(
            [(parameters_to_ndarrays(res.parameters), w)
             for (_, res), w in zip(results, weights, strict=True)]
        )
        names = [str(res.metrics.get(EDGE_ID_METRIC, res.metrics.get(CLIENT_ID_METRIC, "?")))
                 for _, res in results]
        metrics: dict[str, Scalar] = {
            "cloud_weights": json.dumps(dict(zip(names, weights, strict=True))),
            "sh": json.dumps({n: statistical_homogeneity(h)
                              for n, h in zip(names, hists, strict=True)}),
        }
        if self.assignment:
            metrics["assignment"] = json.dumps(self.assignment)
        return ndarrays_to_parameters(merged), metrics
