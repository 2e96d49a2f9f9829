"""SCAFFOLD's client side (Karimireddy et al., 2020): drift correction with control variates.

Each local step uses the corrected gradient ``g(y) - c_i + c``, with ``c`` the server's control
variate (sent with every instruction) and ``c_i`` this client's own (kept between rounds). The
new client variate is the mean raw gradient of this round's local steps, ``c_i+ = mean_k g(y_k)``
(SCAFFOLD's option I estimates the local gradient at the global model; the clients train with
Adam, whose steps are not ``lr * g``, so option II's ``(x - y) / (K lr)`` would mis-scale it);
the client answers with ``delta_c = c_i+ - c_i``. Variates are flat float32 vectors over the
trainable parameters in ``model.parameters()`` order, serialised with ``np.save`` (no pickle,
``common.codec.vector_to_bytes``) into the instruction's config and the answer's metrics, so
their bytes are metered with the messages that carry them. The server side is
:class:`server.scaffold.Scaffold`.
"""

from __future__ import annotations

import numpy as np
import torch


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ScaffoldCorrection:
    """Gradient hook for one round: adds ``c - c_i`` and accumulates the raw gradients."""

    def __init__(self, model: torch.nn.Module, server_c: np.ndarray, client_c: np.ndarray):
        self.correction = torch.from_numpy(server_c - client_c)
        self.client_c = client_c
        self.gradient_sum = torch.zeros(parameter_count(model))
        self.steps = 0

    def __call__(self, model: torch.nn.Module) -> None:
        offset = 0
        for p in model.parameters():
            size = p.numel()
            if p.grad is not None:
                self.gradient_sum[offset:offset + size] += p.grad.detach().flatten().cpu()
                p.grad += self.correction[offset:offset + size].view_as(p.grad).to(p.grad)
            offset += size
        self.steps += 1

    def new_client_control(self) -> np.ndarray:
        """``c_i+``: the mean raw gradient of the round's steps."""
        return (self.gradient_sum / max(1, self.steps)).numpy().astype(np.float32)
