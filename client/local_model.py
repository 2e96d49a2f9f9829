"""The model a client trains, with its optimiser and batch stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DModel
from torch.utils.data import Dataset

from fedphd.common.core.diffusion import (
    BatchStream,
    DiffusionTrainer,
    endless_batches,
    make_noise_scheduler,
)
from fedphd.common.core.models import StateTensors, architecture_from_json, build_unet
from fedphd.common.settings.config import RunConfig, TrainingConfig
from fedphd.common.wire.keys import ARCH_KEY


class LocalModel:
    """The U-Net of the architecture the server last described, its trainer (kept across
    rounds: Adam's moments, warm-up, noise generator) and this client's batch stream."""

    def __init__(self, cfg: RunConfig, client_id: int, dataset: Dataset,
                 device: torch.device) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.dataset = dataset
        self.device = device
        self.arch_json: str | None = None
        self.trainer: DiffusionTrainer | None = None
        self.batches: BatchStream | None = None
        self._state: tuple[torch.nn.Module, StateTensors] | None = None

    @property
    def model(self) -> UNet2DModel:
        if self.trainer is None:
            raise RuntimeError("no model yet: the client has had no instruction")
        return self.trainer.model

    def training_config(self) -> TrainingConfig:
        # Each client draws its own noise and batch order: same run seed, distinct streams.
        return self.cfg.training.model_copy(
            update={"seed": self.cfg.training.seed + 1000 * (self.client_id + 1)}
        )

    def prepare(self, arch_json: str) -> bool:
        """Rebuild when the architecture changed; whether it did."""
        if arch_json == self.arch_json:
            return False
        self.rebuild(arch_json)
        return True

    def rebuild(self, arch_json: str) -> None:
        """Build the model the server described; a new architecture gets a fresh optimiser.

        Its initial weights are the run's (seeded like the cloud's), so parts that are never
        sent start where the global model started."""
        try:
            model = build_unet(architecture_from_json(arch_json), seed=self.cfg.seed)
        except (TypeError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"cannot build the U-Net the server described in {ARCH_KEY}: "
                             f"{error}") from None
        training = self.training_config()
        self._state = None
        self.trainer = DiffusionTrainer(
            model, make_noise_scheduler(self.cfg.diffusion), training, self.device
        )
        self.batches = endless_batches(self.dataset, training.batch_size, training.seed,
                                       self.device)
        self.arch_json = arch_json

    @property
    def state_tensors(self) -> StateTensors:
        """The model's ``state_dict()`` (live tensors, in wire order), kept for the model's
        life: its tensors share the parameters' storage (training and loading write in
        place; a new architecture is a new model), and building it walks every module,
        several times a round otherwise."""
        model = self.model
        if self._state is None or self._state[0] is not model:
            self._state = (model, model.state_dict())
        return self._state[1]

    def train(self, steps: int, lr: float,
              extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
              gradient_hook: Callable[[torch.nn.Module], None] | None = None) -> list[float]:
        """``steps`` optimiser steps at base learning rate ``lr`` (warm-up continues)."""
        trainer = self.trainer
        trainer.lr_schedule.base_lrs = [lr for _ in trainer.lr_schedule.base_lrs]
        return trainer.train(self.batches, steps, extra_loss=extra_loss,
                             gradient_hook=gradient_hook)

    def state(self) -> dict[str, Any] | None:
        """Live references (the caller copies them); None before the first instruction."""
        if self.trainer is None:
            return None
        return {"arch_json": self.arch_json, "weights": self.state_tensors,
                "trainer": self.trainer.state_dict(), "batches": self.batches.position}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.trainer, self.batches, self.arch_json = None, None, None
            return
        if state["arch_json"] != self.arch_json:
            self.rebuild(state["arch_json"])
        self.trainer.model.load_state_dict(state["weights"])
        self.trainer.load_state_dict(state["trainer"])
        self.batches.seek(state["batches"])
