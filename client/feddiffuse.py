"""FedDiffuse's client side: train only the U-Net groups the instruction names.

With ``T`` the groups of ``fedphd.train_groups`` (USPLIT: one side of the U-Net, maybe ``mid``),
a local step updates ``w_g`` for ``g in T`` only; every other group keeps the weights it
received (or, for a private group, this client's own), because its parameters get no
gradient and Adam skips parameters without one. Which groups travel each way is the generic
partial-sharing protocol of the client, not this method. The server side is
:class:`fedphd.server.feddiffuse.FedDiffuse`.
"""

from __future__ import annotations

import torch

from fedphd.client.method import Instruction, LocalMethod, RoundTerm
from fedphd.common.core.unet_groups import group_of, is_everything, parse_groups
from fedphd.common.wire.keys import TRAIN_GROUPS_KEY


def freeze_all_but(model: torch.nn.Module, groups: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Stop gradients outside ``groups`` (Adam skips parameters without a gradient, so they
    stay exactly as received); returns the parameters to unfreeze afterwards."""
    if is_everything(groups):
        return []
    frozen = []
    for name, parameter in model.named_parameters():
        if group_of(name) not in groups and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen.append(parameter)
    return frozen


class FrozenGroups(RoundTerm):
    """The parameters frozen for one round; closing the round lets them train again."""

    def __init__(self, frozen: list[torch.nn.Parameter]) -> None:
        self.frozen = frozen

    def close(self) -> None:
        for parameter in self.frozen:
            parameter.requires_grad_(True)


class FedDiffuseLocal(LocalMethod):
    """Active when the instruction's train groups leave a group out; stateless."""

    name = "feddiffuse"

    def check(self, config: Instruction) -> None:
        parse_groups(config.get(TRAIN_GROUPS_KEY))

    def begin_round(self, model: torch.nn.Module, config: Instruction) -> FrozenGroups | None:
        groups = parse_groups(config.get(TRAIN_GROUPS_KEY))
        if is_everything(groups):
            return None
        return FrozenGroups(freeze_all_but(model, groups))
