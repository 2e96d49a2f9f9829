"""FedProx's client side (FedDM-prox): the proximal term in the local loss.

``L_k(w) = L_ddpm(w) + (mu / 2) * ||w - w_global||^2``, whose gradient adds
``mu * (w - w_global)`` and pulls local training towards the model the server sent. The server
side is Flower's own ``flwr.server.strategy.FedProx``, which puts ``proximal_mu`` into every
fit instruction, or the message API's ``flwr.serverapp.strategy.FedProx``, which sends
``proximal-mu``; any strategy may send either key.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedphd.client.method import Instruction, LocalMethod, RoundTerm
from fedphd.common.wire.keys import MESSAGE_PROXIMAL_MU_KEY, PROXIMAL_MU_KEY


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
    """The extra loss for :class:`fedphd.common.core.diffusion.DiffusionTrainer`, anchored at
    ``model`` now."""
    anchor = snapshot(model)
    return lambda current: proximal_term(current, anchor, mu)


class ProximalRound(RoundTerm):
    """``(mu / 2) * ||w - w_global||^2`` with ``w_global`` the weights the round started from."""

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        self.mu = mu
        self._term = proximal_loss(model, mu)

    def describe(self) -> str:
        return f"proximal term, mu = {self.mu:g}"

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        return self._term(model)


class FedProxLocal(LocalMethod):
    """Active when the instruction's ``proximal_mu`` (or ``proximal-mu``) is above 0; carries
    nothing between rounds (the anchor is each round's received model)."""

    name = "fedprox"

    def begin_round(self, model: torch.nn.Module, config: Instruction) -> ProximalRound | None:
        mu = float(config.get(PROXIMAL_MU_KEY, config.get(MESSAGE_PROXIMAL_MU_KEY, 0.0)))
        return ProximalRound(model, mu) if mu > 0 else None
