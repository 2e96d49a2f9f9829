"""A client's end of its link to the server: the codecs' state on both directions."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedphd.common.federation.held import HeldModel, encode_reply
from fedphd.common.wire import codec
from fedphd.common.wire.quantization import ErrorFeedback
from fedphd.common.wire.transport import Parameters, Scalar


class ClientLink:
    """Quantised downlinks are updates from the last model received (:class:`HeldModel`);
    quantised uplinks keep this client's residuals, one per set of groups it sends, and draw
    stochastic rounding from this client's own generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.held = HeldModel()
        self.feedback: dict[str, ErrorFeedback] = {}
        self.rng = rng

    def receive(self, parameters: Parameters, config: dict[str, Scalar]) -> list[np.ndarray]:
        return self.held.decode(parameters, config)

    def keep_soon(self, arrays: list[np.ndarray]) -> codec.PendingDigest:
        """Hold ``arrays`` (the received part, as loaded) as the next base; their digest,
        computed meanwhile."""
        return self.held.keep_soon(arrays)

    def reply(self, arrays: list[np.ndarray], reference: list[np.ndarray],
              config: dict[str, Scalar], groups: str) -> Parameters:
        """The answer's tensors in the instruction's uplink codec (updates vs ``reference``)."""
        feedback = self.feedback.setdefault(groups, ErrorFeedback())
        return encode_reply(arrays, reference, config, feedback, self.rng)

    def state(self) -> dict[str, Any]:
        """Live objects: the caller copies them."""
        return {"feedback": self.feedback, "held": self.held, "rng": self.rng}

    def load_state(self, state: dict[str, Any]) -> None:
        self.feedback, self.held, self.rng = state["feedback"], state["held"], state["rng"]
