"""SCAFFOLD's client side (Karimireddy et al., 2020): drift correction with control variates.

Each local step uses the corrected gradient ``g(y) - c_i + c``, with ``c`` the server's control
variate (sent with every instruction) and ``c_i`` this client's own (kept between rounds). The
new client variate is the mean raw gradient of this round's local steps, ``c_i+ = mean_k g(y_k)``
(SCAFFOLD's option I estimates the local gradient at the global model; the clients train with
Adam, whose steps are not ``lr * g``, so option II's ``(x - y) / (K lr)`` would mis-scale it);
the client answers with ``delta_c = c_i+ - c_i``. Variates are flat float32 vectors over the
trainable parameters in ``model.parameters()`` order, serialised with ``np.save`` (no pickle,
``fedphd.common.wire.codec.vector_to_bytes``) into the instruction's config and the answer's
metrics, so
their bytes are metered with the messages that carry them. The server side is
:class:`fedphd.server.scaffold.Scaffold`.
"""

from __future__ import annotations

import numpy as np
import torch

from fedphd.client.method import Instruction, LocalMethod, RoundTerm
from fedphd.common.wire import codec
from fedphd.common.wire.keys import CONTROL_DELTA_KEY, SERVER_CONTROL_KEY
from fedphd.common.wire.transport import Scalar


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ScaffoldCorrection:
    """Gradient hook for one round: adds ``c - c_i`` and accumulates the raw gradients."""

    def __init__(self, model: torch.nn.Module, server_c: np.ndarray, client_c: np.ndarray):
        # Both vectors live where the gradients do, moved there once per round: on a GPU a
        # per-step copy of each gradient to the host (and back) would stall every step.
        device = next(model.parameters(), torch.empty(0)).device
        self.correction = torch.from_numpy(server_c - client_c).to(device, torch.float32)
        self.client_c = client_c
        self.gradient_sum = torch.zeros(parameter_count(model), device=device)
        self.steps = 0

    def __call__(self, model: torch.nn.Module) -> None:
        offset = 0
        for p in model.parameters():
            size = p.numel()
            if p.grad is not None:
                self.gradient_sum[offset:offset + size] += p.grad.detach().flatten()
                p.grad += self.correction[offset:offset + size].view_as(p.grad)
            offset += size
        self.steps += 1

    def new_client_control(self) -> np.ndarray:
        """``c_i+``: the mean raw gradient of the round's steps."""
        return (self.gradient_sum / max(1, self.steps)).cpu().numpy().astype(np.float32)


class ScaffoldRound(RoundTerm):
    """One round's correction; finishing it moves ``c_i`` to ``c_i+`` and answers ``delta_c``."""

    def __init__(self, method: ScaffoldLocal, correction: ScaffoldCorrection) -> None:
        self.method, self.correction = method, correction

    def after_backward(self, model: torch.nn.Module) -> None:
        self.correction(model)

    def finish(self, model: torch.nn.Module) -> dict[str, Scalar]:
        new_c = self.correction.new_client_control()
        delta = new_c - self.method.client_c
        self.method.client_c = new_c
        return {CONTROL_DELTA_KEY: codec.vector_to_bytes(delta)}


class ScaffoldLocal(LocalMethod):
    """Active when the instruction carries the server's control variate ``c``; carries this
    client's ``c_i`` (zeros on its first round and after the architecture changed)."""

    name = "scaffold"

    def __init__(self) -> None:
        self.client_c: np.ndarray | None = None

    def begin_round(self, model: torch.nn.Module, config: Instruction) -> ScaffoldRound | None:
        if SERVER_CONTROL_KEY not in config:
            return None
        size = parameter_count(model)
        server_c = codec.vector_from_bytes(config[SERVER_CONTROL_KEY], size, "server control")
        if self.client_c is None or self.client_c.shape != (size,):
            self.client_c = np.zeros(size, dtype=np.float32)
        return ScaffoldRound(self, ScaffoldCorrection(model, server_c, self.client_c))

    def state(self) -> np.ndarray | None:
        return self.client_c

    def load_state(self, state: np.ndarray | None) -> None:
        self.client_c = state
