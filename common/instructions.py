"""The keys a server puts in ``FitIns.config`` and a client or edge puts in ``FitRes.metrics``.

Flower config values are scalars, so structured values (architecture, histograms, logs)
travel as JSON strings.
"""

from __future__ import annotations

from typing import Any

from common.config import RunConfig
from common.strategy import ARCH_KEY, ROUND_KEY, UPLINK_KEY

LOCAL_STEPS_KEY = "fedphd.local_steps"
LR_KEY = "fedphd.lr"
EDGE_ROUNDS_KEY = "fedphd.edge_rounds"
# The cloud round an edge's instruction belongs to (flat mode: ROUND_KEY is the cloud round).
# A client seeing a cloud round again replays it from that round's start (resumed cloud).
CLOUD_ROUND_KEY = "fedphd.cloud_round"
GROUP_LASSO_KEY = "fedphd.group_lasso"  # lambda of FedPhD's sparse training, 0 = off
# Re-assignment: {client_id: edge address} from the cloud; an edge sends MOVE_KEY to a client.
ASSIGNMENT_KEY = "fedphd.assignment"
MOVE_KEY = "fedphd.move_to"
# SCAFFOLD: the server control variate (instruction) and a client's update of its own (answer).
SERVER_CONTROL_KEY = "scaffold_c"
CONTROL_DELTA_KEY = "scaffold_delta_c"
# MOON: weight and temperature of the model-contrastive term.
MOON_MU_KEY = "moon_mu"
MOON_TAU_KEY = "moon_tau"

__all__ = [
    "ARCH_KEY",
    "ASSIGNMENT_KEY",
    "CLOUD_ROUND_KEY",
    "CONTROL_DELTA_KEY",
    "MOON_MU_KEY",
    "MOON_TAU_KEY",
    "SERVER_CONTROL_KEY",
    "MOVE_KEY",
    "EDGE_ROUNDS_KEY",
    "GROUP_LASSO_KEY",
    "LOCAL_STEPS_KEY",
    "LR_KEY",
    "ROUND_KEY",
    "UPLINK_KEY",
    "client_instruction",
]


def client_instruction(cfg: RunConfig, arch_json: str, group_lasso: float = 0.0) -> dict[str, Any]:
    """What every client needs besides the weights: the architecture and local training."""
    return {
        ARCH_KEY: arch_json,
        LOCAL_STEPS_KEY: cfg.training.local_steps,
        LR_KEY: cfg.training.lr,
        GROUP_LASSO_KEY: group_lasso,
    }
