"""FedDiffuse (de Goede et al., arXiv 2406.12575): FedAvg that shares only parts of the U-Net.

The U-Net splits into groups ``down`` (input conv, time embedding, down blocks), ``mid``
(bottleneck) and ``up`` (up blocks, output norm and conv); see
:mod:`fedphd.common.core.unet_groups`.

* ``full``: FedAvg of everything.
* ``udec``: clients train their whole model but share only ``up``; ``down`` and ``mid`` stay
  private on each client's disk. Only ``up`` crosses the wire, both ways.
* ``ulatdec``: ``mid`` and ``up`` are shared; ``down`` is private.
* ``usplit``: every round the sampled clients are paired at random; in each pair one client
  trains ``up`` and the other ``down``, and ``mid`` goes to one of the two at random; an odd
  client out trains ``mid`` and a random side. Clients receive the whole model and send back
  only what they trained.

Aggregation, per group ``g`` with ``S_g`` the clients that returned it this round::

    w_g <- sum_{k in S_g} n_k w_g^k / sum_{k in S_g} n_k      (unchanged when S_g is empty)

With ``udec``/``ulatdec`` the server holds no usable model of its own (its private groups are
never trained), so quality is measured at the clients: each evaluates its own model with the
shared groups of the global one (``evaluate_global_model = False``).

Each round's record (``metrics.jsonl``, the cloud line's ``strategy``) holds
``groups_averaged`` (per group, how many answers it was averaged over) and, with ``usplit``,
``groups_trained``: which client trained which groups, by the identity its server
established (its certificate's, where there is one), else the ``client_id`` it declared.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from fedphd.common.core.unet_groups import GROUPS, format_groups, group_indices
from fedphd.common.federation.validation import sender_name
from fedphd.common.wire.keys import (
    EVALUATE_KEY,
    RETURN_GROUPS_KEY,
    SEND_GROUPS_KEY,
    TRAIN_GROUPS_KEY,
)
from fedphd.common.wire.transport import (
    ClientManager,
    ClientProxy,
    EvaluateIns,
    FedAvg,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    peer_identity,
)

# mode -> (groups sent, groups trained, groups returned) for every client.
_FIXED_MODES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "full": (GROUPS, GROUPS, GROUPS),
    "udec": (("up",), GROUPS, ("up",)),
    "ulatdec": (("mid", "up"), GROUPS, ("mid", "up")),
}
MODES = (*_FIXED_MODES, "usplit")


def usplit_assignment(cids: Sequence[str], rng: np.random.Generator) -> dict[str, tuple[str, ...]]:
    """USPLIT's groups per client for one round.

    Clients are shuffled and paired; the first of a pair trains ``up``, the second ``down``,
    and ``mid`` goes to either with probability 1/2. An odd client out trains ``mid`` and a
    random side.
    """
    order = [cids[i] for i in rng.permutation(len(cids))]
    assignment: dict[str, tuple[str, ...]] = {}
    for start in range(0, len(order) - 1, 2):
        first, second = order[start], order[start + 1]
        groups = {first: {"up"}, second: {"down"}}
        groups[first if rng.random() < 0.5 else second].add("mid")
        for cid, names in groups.items():
            assignment[cid] = tuple(g for g in GROUPS if g in names)
    if len(order) % 2:
        side = "up" if rng.random() < 0.5 else "down"
        assignment[order[-1]] = tuple(g for g in GROUPS if g in {"mid", side})
    return assignment


def average_groups(
    global_model: list[np.ndarray],
    names: Sequence[str],
    answers: Sequence[tuple[tuple[str, ...], list[np.ndarray], int]],
) -> tuple[list[np.ndarray], dict[str, int]]:
    """Per-group sample-weighted mean over the answers that carry the group.

    ``answers`` holds ``(groups returned, their tensors in wire order, n_k)``. Returns the new
    model and, per group, how many answers it was averaged over.
    """
    model = list(global_model)
    counts = dict.fromkeys(GROUPS, 0)
    for group in GROUPS:
        indices = group_indices(names, (group,))
        sums: list[np.ndarray] | None = None
        total = 0
        for groups, arrays, examples in answers:
            if group not in groups:
                continue
            position = {index: at for at, index in enumerate(group_indices(names, groups))}
            part = [arrays[position[i]].astype(np.float64) * examples for i in indices]
            sums = part if sums is None else [s + p for s, p in zip(sums, part, strict=True)]
            total += examples
            counts[group] += 1
        if sums is not None and total > 0:
            for index, summed in zip(indices, sums, strict=True):
                model[index] = (summed / total).astype(global_model[index].dtype)
    return model, counts


class FedDiffuse(FedAvg):
    """FedAvg over the shared U-Net groups only (``mode``: full, usplit, udec, ulatdec)."""

    # Its instructions address clients directly (their private parts): no edge in between.
    flat_only = True

    def __init__(
        self, *, mode: str = "full", tensor_names: list[str] | None = None, seed: int = 0,
        **kwargs,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if tensor_names is None:
            raise ValueError("FedDiffuse needs the model's tensor_names (the drivers pass them)")
        if mode in ("udec", "ulatdec"):
            # Each client's model differs (private parts): evaluate every client.
            kwargs["fraction_evaluate"] = 1.0
            kwargs["min_evaluate_clients"] = 1
        super().__init__(**kwargs)
        self.mode = mode
        self.names = list(tensor_names)
        self.seed = seed
        self.evaluate_global_model = mode in ("full", "usplit")
        self._global: list[np.ndarray] = []
        self._returned: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"FedDiffuse(mode={self.mode})"

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self._global = parameters_to_ndarrays(parameters)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        plan = self._plan(server_round, [proxy.cid for proxy, _ in instructions])
        self._returned = {cid: returned for cid, (_, _, returned) in plan.items()}
        out = []
        for proxy, ins in instructions:
            sent, trained, returned = plan[proxy.cid]
            config = {**ins.config, SEND_GROUPS_KEY: format_groups(sent),
                      TRAIN_GROUPS_KEY: format_groups(trained),
                      RETURN_GROUPS_KEY: format_groups(returned)}
            out.append((proxy, FitIns(ins.parameters, config)))
        return out

    def _plan(self, server_round: int, cids: list[str]):
        if self.mode in _FIXED_MODES:
            return dict.fromkeys(cids, _FIXED_MODES[self.mode])
        rng = np.random.default_rng([self.seed, server_round])
        # In sampling order, which follows the clients' ids (BoundedClientManager); connection
        # ids are random per connection, so sorting by them would not repeat.
        return {cid: (GROUPS, groups, groups)
                for cid, groups in usplit_assignment(cids, rng).items()}

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results or (failures and not self.accept_failures):
            return None, {}
        answers = [
            (self._returned[proxy.cid], parameters_to_ndarrays(res.parameters), res.num_examples)
            for proxy, res in results
        ]
        model, counts = average_groups(self._global, self.names, answers)
        metrics: dict[str, Scalar] = {"groups_averaged": json.dumps(counts)}
        if self.mode == "usplit":
            metrics["groups_trained"] = json.dumps(self._trained_by(results))
        if self.fit_metrics_aggregation_fn:
            metrics.update(self.fit_metrics_aggregation_fn(
                [(res.num_examples, res.metrics) for _, res in results]
            ))
        return ndarrays_to_parameters(model), metrics

    def _trained_by(self, results: list[tuple[ClientProxy, FitRes]]) -> dict[str, list[str]]:
        """Which client trained which groups this round (the pairing is random: without this
        a round's record could not say whose update went into which half of the model)."""
        return {_client_name(proxy, res): list(self._returned[proxy.cid])
                for proxy, res in results}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Clients evaluate their own models, holding the shared groups of the global one."""
        requests = super().configure_evaluate(server_round, parameters, client_manager)
        sent = _FIXED_MODES.get(self.mode, (GROUPS,))[0]
        return [
            (proxy, EvaluateIns(ins.parameters, {**ins.config, EVALUATE_KEY: True,
                                                 SEND_GROUPS_KEY: format_groups(sent)}))
            for proxy, ins in requests
        ]


def _client_name(proxy: ClientProxy, res: FitRes) -> str:
    """The established identity of the sender ("client 3"); without one (plain links, test
    fakes) what it declared in its answer, else its connection id."""
    identity = peer_identity(proxy)
    return identity.name if identity is not None else sender_name(proxy, res)
