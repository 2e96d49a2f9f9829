"""FedPhD's pruning schedule: sparse training, then one structured pruning at the cloud.

With ``pruning.sparse_rounds = s > 0`` the first ``s`` cloud rounds train the dense model with
FedPhD's group-lasso penalty (its weight ``pruning.group_lasso`` travels in every instruction
under ``GROUP_LASSO_KEY``, read by :mod:`fedphd.client.fedphd`); the trained global model is
then pruned at ratio ``pruning.ratio`` before round ``s + 1``, and every later round trains the
pruned model without the penalty. With ``s = 0`` the initial model is pruned at the start.

The pruning itself is :func:`fedphd.common.core.pruning.prune_unet`; this module decides when.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from diffusers import UNet2DModel

from fedphd.common.core.pruning import prune_unet, to_pruned_model
from fedphd.common.settings.config import PruningConfig
from fedphd.common.wire.keys import GROUP_LASSO_KEY
from fedphd.common.wire.transport import Scalar
from fedphd.server.metrics_log import MetricsLog

# The cloud's log: these lines read as the cloud's, as they did before the schedule moved here.
log = logging.getLogger("fedphd.cloud")


class PruningSchedule:
    """FedPhD's :class:`~fedphd.server.schedule.ModelSchedule`: prune once, after the sparse
    rounds (or at the start without them)."""

    def __init__(self, pruning: PruningConfig) -> None:
        self.ratio = pruning.ratio
        self.lam = pruning.group_lasso if pruning.sparse_rounds > 0 else 0.0
        # The round the pruned model is first trained in; 0: pruned at the start.
        self.prune_before = pruning.sparse_rounds + 1 if pruning.sparse_rounds > 0 else 0
        self.pruned = False

    def __repr__(self) -> str:
        return f"PruningSchedule(ratio={self.ratio}, before round {self.prune_before})"

    def instruction_keys(self) -> dict[str, Scalar]:
        # Sent as 0 (off) once pruned rather than left out: the client reads 0 as off.
        return {GROUP_LASSO_KEY: 0.0 if self.pruned else self.lam}

    def before_round(
        self, server_round: int, current: Callable[[], UNet2DModel], metrics: MetricsLog
    ) -> UNet2DModel | None:
        if self.pruned or server_round != self.prune_before:
            return None
        model = current()  # after sparse training: the trained global model
        report = prune_unet(model, self.ratio)
        pruned = to_pruned_model(model)
        self.pruned = True
        # The round after which it was pruned (0: the initial model).
        after = max(server_round - 1, 0)
        metrics.write({"tier": "pruning", "round": after, "ratio": self.ratio,
                       **report.to_dict()})
        log.info("cloud: pruned at ratio %s: %d -> %d parameters, %d -> %d MACs",
                 self.ratio, report.params_before, report.params_after,
                 report.macs_before, report.macs_after)
        return pruned

    def state(self) -> dict[str, Any]:
        return {"pruned": self.pruned}

    def load_state(self, state: dict[str, Any]) -> None:
        self.pruned = bool(state.get("pruned", False))
