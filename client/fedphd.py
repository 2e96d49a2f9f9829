"""FedPhD's client side: sparse training in the rounds before the cloud prunes.

In sparse rounds the cloud sends ``lambda`` (``pruning.group_lasso``) with the instruction and
every client minimises ``L(w) = L_ddpm(w) + lambda * sum_W sum_c ||W[c]||_2`` (group lasso over
output channels, see :func:`group_lasso_penalty`), which drives whole channels towards zero so
the cloud's magnitude pruning removes them at little cost. The server side is the cloud's
pruning schedule (``fedphd.server.fedphd_pruning``), which puts ``lambda`` into its instructions in
sparse rounds; edges forward it to their clients.
"""

from __future__ import annotations

import torch
from torch import nn

from fedphd.client.method import Instruction, LocalMethod, RoundTerm
from fedphd.common.wire.keys import GROUP_LASSO_KEY

_LASSO_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def group_lasso_penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """Group lasso over output channels: lam · sum_W sum_c ||W[c]||_2.

    W runs over the weights of every conv and linear layer except ``conv_out`` (whose outputs
    are never pruned); W[c] is output channel c with all its inputs and kernel taps. The norms
    are not squared, so the gradient lam · W[c] / ||W[c]||_2 pulls whole channels towards zero
    at a constant rate, and magnitude pruning then removes them at little cost.
    """
    excluded = getattr(model, "conv_out", None)
    norms = [
        torch.linalg.vector_norm(module.weight.flatten(1), ord=2, dim=1).sum()
        for module in model.modules()
        if isinstance(module, _LASSO_TYPES) and module is not excluded
    ]
    if not norms:
        return torch.zeros(())
    return lam * torch.stack(norms).sum()


class GroupLassoRound(RoundTerm):
    """``lambda * sum_W sum_c ||W[c]||_2`` on the model being trained."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def loss(self, model: torch.nn.Module) -> torch.Tensor:
        return group_lasso_penalty(model, self.lam)


class FedPhDLocal(LocalMethod):
    """Active in sparse rounds (the instruction's ``lambda`` above 0); stateless."""

    name = "fedphd"

    def begin_round(self, model: torch.nn.Module, config: Instruction) -> GroupLassoRound | None:
        lam = float(config.get(GROUP_LASSO_KEY, 0.0))
        return GroupLassoRound(lam) if lam > 0 else None
