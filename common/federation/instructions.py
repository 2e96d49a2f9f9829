"""What every client instruction carries besides the weights."""

from __future__ import annotations

from typing import Any

from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.keys import ARCH_KEY, LOCAL_STEPS_KEY, LR_KEY

# Keys every instruction of a FedPhD server carries, fit and evaluate alike (the strategy
# wrapper adds them whatever the inner strategy sends): an instruction without them comes
# from a server that is not a FedPhD server (e.g. stock Flower's FedAvg).
PROTOCOL_KEYS = (ARCH_KEY,)


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


def missing_protocol_key(config: dict[str, Any]) -> str | None:
    """The first protocol key an instruction's config lacks (None: it has them all)."""
    return next((key for key in PROTOCOL_KEYS if key not in config), None)


def foreign_server(address: str, detail: str) -> str:
    """What a receiver says of a server whose instruction lacks the protocol's keys."""
    return f"the server at {address} is not a FedPhD server: {detail}"
