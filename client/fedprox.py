"""FedProx's client side (FedDM-prox): the proximal term in the local loss.

``L_k(w) = L_ddpm(w) + (mu / 2) * ||w - w_global||^2``, whose gradient adds
``mu * (w - w_global)`` and pulls local training towards the model the server sent. The server
side is Flower's own ``flwr.server.strategy.FedProx``, which puts ``proximal_mu`` into every
fit instruction; any strategy may send that key.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PROXIMAL_MU_KEY = "proximal_mu"  # the key Flower's FedProx strategy sends


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    """Frozen copies of the trainable parameters: the anchor ``w_global`` of this round."""
    return [p.detach().clone() for p in model.parameters()]


def proximal_term(model: torch.nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """``(mu / 2) * sum_i ||w_i - anchor_i||^2`` over the trainable parameters."""
    squares = [
        torch.sum((p - a) ** 2) for p, a in zip(model.parameters(), anchor, strict=True)
    ]
    return 0.5 * mu * torch.stack(squares).sum()


def proximal_loss(model: torch.nn.Module, mu: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """The extra loss for :class:`common.diffusion.DiffusionTrainer`, anchored at ``model`` now."""
    anchor = snapshot(model)
    return lambda current: proximal_term(current, anchor, mu)
