"""MOON's client side: the model-contrastive term (Li et al., 2021) on a U-Net representation.

For a batch, ``z`` is the current model's representation, ``z_glob`` the global model's (the
weights this round started from) and ``z_prev`` this client's model at the end of its previous
round, all on the same noisy images and timesteps::

    l_con = -log( exp(cos(z, z_glob)/tau) / (exp(cos(z, z_glob)/tau) + exp(cos(z, z_prev)/tau)) )
    L = L_ddpm + mu * l_con

The representation is the U-Net's bottleneck (``mid_block`` output), spatially averaged: it
carries gradient to everything below it. (The reference code's term used tensors without
gradient and so changed nothing; a test here checks that this one changes the gradients.)
The server side is :class:`fedphd.server.moon.MOON`, which sends ``moon_mu`` and ``moon_tau``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from fedphd.client.method import Instruction, LocalMethod, RoundTerm
from fedphd.common.core.models import load_ndarrays, model_to_ndarrays
from fedphd.common.wire.keys import MOON_MU_KEY, MOON_TAU_KEY


def representation(features: torch.Tensor) -> torch.Tensor:
    """Spatial mean of bottleneck features: one vector per image."""
    return features.mean(dim=(2, 3))


def contrastive_loss(
    z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float
) -> torch.Tensor:
    """MOON's ``l_con`` averaged over the batch (positive pair: current and global)."""
    positive = F.cosine_similarity(z, z_glob, dim=1) / tau
    negative = F.cosine_similarity(z, z_prev, dim=1) / tau
    logits = torch.stack([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


def frozen_copy(model: UNet2DModel) -> UNet2DModel:
    clone = copy.deepcopy(model).eval()
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone


class MoonTerm:
    """``mu * l_con`` for :class:`fedphd.common.core.diffusion.DiffusionTrainer` as an extra loss.

    Hooks on the training model record each step's inputs and bottleneck output; calling the
    term runs the frozen global and previous models on the same inputs.
    """

    def __init__(
        self, model: UNet2DModel, global_model: UNet2DModel, previous_model: UNet2DModel,
        mu: float, tau: float,
    ) -> None:
        self.global_model, self.previous_model = global_model, previous_model
        self.mu, self.tau = mu, tau
        self._inputs: tuple = ()
        self._features: torch.Tensor | None = None
        self._hooks = [
            model.register_forward_pre_hook(self._keep_inputs, with_kwargs=True),
            model.mid_block.register_forward_hook(self._keep_features),
        ]

    def _keep_inputs(self, _module, args, kwargs):
        self._inputs = (args[0] if args else kwargs["sample"],
                        args[1] if len(args) > 1 else kwargs["timestep"])

    def _keep_features(self, _module, _args, output):
        self._features = output

    def _bottleneck(self, model: UNet2DModel) -> torch.Tensor:
        captured = {}
        hook = model.mid_block.register_forward_hook(
            lambda _m, _a, output: captured.setdefault("z", output)
        )
        try:
            with torch.no_grad():
                model(*self._inputs)
        finally:
            hook.remove()
        return representation(captured["z"])

    def __call__(self, model: UNet2DModel) -> torch.Tensor:
        if self._features is None:
            raise RuntimeError("MOON term called before a forward pass of the model")
        z = representation(self._features)
        z_glob = self._bottleneck(self.global_model)
        z_prev = self._bottleneck(self.previous_model)
        return self.mu * contrastive_loss(z, z_glob, z_prev, self.tau)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


class MoonRound(RoundTerm):
    """One round's ``mu * l_con``; closing it records the model the round leaves as the next
    round's previous local model."""

    def __init__(self, method: MoonLocal, model: UNet2DModel, term: MoonTerm) -> None:
        self.method, self.model, self.term = method, model, term

    def describe(self) -> str:
        return f"MOON term, mu = {self.term.mu:g}"

    def loss(self, model: UNet2DModel) -> torch.Tensor:
        return self.term(model)

    def close(self) -> None:
        self.term.close()
        # Also after a failed round: z_prev is this client's model as the round left it.
        self.method.previous_local = model_to_ndarrays(self.model)


class MoonLocal(LocalMethod):
    """Active when the instruction's ``moon_mu`` is above 0 (``moon_tau`` defaults to 0.5).
    Carries this client's previous local model; the global model is each round's received
    one."""

    name = "moon"

    def __init__(self) -> None:
        self.previous_local: list[np.ndarray] | None = None

    def begin_round(self, model: UNet2DModel, config: Instruction) -> MoonRound | None:
        mu = float(config.get(MOON_MU_KEY, 0.0))
        if mu <= 0:
            return None
        tau = float(config.get(MOON_TAU_KEY, 0.5))
        term = MoonTerm(model, frozen_copy(model), self._previous_model(model), mu, tau)
        return MoonRound(self, model, term)

    def _previous_model(self, model: UNet2DModel) -> UNet2DModel:
        """This client's last local model; the global one on its first round or after the
        architecture changed."""
        previous_model = frozen_copy(model)
        previous = self.previous_local
        if previous is not None and [a.shape for a in previous] == [
            t.shape for t in model.state_dict().values()
        ]:
            load_ndarrays(previous_model, previous)
        return previous_model

    def state(self) -> list[np.ndarray] | None:
        return self.previous_local

    def load_state(self, state: list[np.ndarray] | None) -> None:
        self.previous_local = state
