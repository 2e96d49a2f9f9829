"""What every client instruction carries besides the weights."""

from __future__ import annotations

from typing import Any

from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.keys import ARCH_KEY, LOCAL_STEPS_KEY, LR_KEY


def client_instruction(
    cfg: RunConfig, arch_json: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The architecture and local training settings, plus ``extra`` keys (those a method's
    server side adds for every client, e.g. the schedule's regularisation weight)."""
    return {
        ARCH_KEY: arch_json,
        LOCAL_STEPS_KEY: cfg.training.local_steps,
        LR_KEY: cfg.training.lr,
        **(extra or {}),
    }
