"""What an edge carries from one cloud round to the next, and its replay after a resume.

Quantisation residuals and the models held on both links, and the rounding generator, are
kept as they were when each cloud round began; the same cloud round again (the cloud resumed
from its checkpoint) is replayed from there, as its clients replay theirs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from fedphd.common.federation.held import HeldModel, Rebuilt
from fedphd.common.wire.quantization import ErrorFeedback


@dataclass
class Carried:
    """An edge's state between cloud rounds."""

    rng: np.random.Generator
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)  # uplink to the cloud
    held: HeldModel = field(default_factory=HeldModel)  # the last global model
    # What each connected client holds (the base of quantised downlinks), for the
    # architecture ``client_models_arch``; handed to each cloud round's fresh strategy.
    client_models: dict[str, Rebuilt] = field(default_factory=dict)
    client_models_arch: str = ""

    def snapshot(self) -> Carried:
        """A copy that shares the arrays: held models and residuals are replaced each round,
        never modified, so a snapshot costs no model-sized memory per client."""
        return Carried(copy.deepcopy(self.rng), self.feedback.snapshot(), copy.copy(self.held),
                       dict(self.client_models), self.client_models_arch)


class CloudRoundStart:
    """The carried state when the latest cloud round began."""

    def __init__(self) -> None:
        self.cloud_round: int | None = None
        self.state: Carried | None = None

    def enter(self, cloud_round: int, current: Carried) -> Carried | None:
        """Mark ``cloud_round`` as begun; returns the state to rewind to when it is the same
        cloud round again (a replay), else None."""
        if self.state is not None and cloud_round == self.cloud_round:
            return self.state.snapshot()  # the kept snapshot stays for another replay
        self.cloud_round, self.state = cloud_round, current.snapshot()
        return None
