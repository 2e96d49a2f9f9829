"""FedDDPM and FedDDPM+ (arXiv 2503.06426): server-side correction with auxiliary samples.

Round 1 is the pre-training round: every client trains its own diffusion model from the
initial weights for ``pretrain_steps`` and uploads it (that round's bytes are FedDDPM's extra
traffic). The server samples an auxiliary set from those models, ``n_k / n`` of
``aux_samples`` images from client ``k``'s model, which approximates the global data; the
global model is not changed by that round. Every later round is FedAvg followed by a server
correction on the auxiliary set::

    w_t     = sum_k n_k w_t^k / n                      (FedAvg)
    FedDDPM:  w_t <- w_t - eta * grad L_aux(w_t), ``server_steps`` Adam steps, every round
    FedDDPM+: the same correction, only in a round where learning is slow:
              (L_{t-W} - L_t) / L_{t-W} < threshold

``L_t`` is the DDPM loss of the aggregated model on a held-out part of the auxiliary set with
fixed noise and time steps (so rounds compare), and ``W`` is ``window``. After a correction the
history restarts, so the next one needs ``W`` new rounds of evidence (a one-shot correction
per detected slow phase).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedphd.common.core.diffusion import (
    DiffusionTrainer,
    ddpm_loss,
    endless_batches,
    make_noise_scheduler,
    sample_images,
)
from fedphd.common.core.models import (
    architecture_from_json,
    build_unet,
    load_ndarrays,
    model_to_ndarrays,
)
from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.keys import LOCAL_STEPS_KEY, PHASE_KEY
from fedphd.common.wire.transport import (
    ClientManager,
    ClientProxy,
    FedAvg,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

log = logging.getLogger("fedphd.fedddpm")



class SlowLearning:
    """FedDDPM+'s trigger: relative improvement of the held-out loss over ``window`` rounds
    below ``threshold``."""

    def __init__(self, window: int, threshold: float) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.threshold = window, threshold
        self.history: list[float] = []

    def observe(self, loss: float) -> bool:
        """Record this round's loss; True when learning is slow (the history then restarts)."""
        self.history.append(loss)
        if len(self.history) <= self.window:
            return False
        before = self.history[-1 - self.window]
        slow = (before - loss) / max(abs(before), 1e-12) < self.threshold
        if slow:
            self.history = []
        return slow


def as_training_images(images: np.ndarray) -> torch.Tensor:
    """DDIM output (N x H x W x C in [0, 1]) in the data loaders' layout and range [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2.0 - 1.0


def shares(examples: list[int], total: int) -> list[int]:
    """``total`` split proportionally to ``examples`` (largest remainders; each at least 1)."""
    weights = np.asarray(examples, dtype=np.float64) / max(sum(examples), 1)
    raw = weights * total
    counts = np.maximum(np.floor(raw).astype(int), 1)
    for index in np.argsort(raw - np.floor(raw))[::-1][: max(total - counts.sum(), 0)]:
        counts[index] += 1
    return counts.tolist()


class FedDDPM(FedAvg):
    """FedAvg plus server fine-tuning on samples of the clients' pre-trained models
    (``plus=True``: only when learning is slow)."""

    def __init__(
        self,
        *,
        run_config: RunConfig | None = None,
        architecture: str | None = None,
        pretrain_steps: int = 100,
        aux_samples: int = 256,
        holdout: float = 0.25,
        server_steps: int = 20,
        server_lr: float | None = None,
        plus: bool = False,
        window: int = 2,
        threshold: float = 0.02,
        **kwargs,
    ) -> None:
        if run_config is None or architecture is None:
            raise ValueError("FedDDPM needs run_config and architecture (the drivers pass them)")
        if pretrain_steps < 1 or server_steps < 1 or aux_samples < 2 or not 0 < holdout < 1:
            raise ValueError("FedDDPM needs pretrain_steps >= 1, server_steps >= 1, "
                             "aux_samples >= 2 and 0 < holdout < 1")
        super().__init__(**kwargs)
        self.cfg = run_config
        self.architecture = architecture
        self.pretrain_steps = pretrain_steps
        self.aux_samples = aux_samples
        self.holdout = holdout
        self.server_steps = server_steps
        self.server_lr = server_lr or run_config.training.lr
        self.plus = plus
        self.slow = SlowLearning(window, threshold)
        self.device = torch.device(run_config.training.device)
        self.noise_scheduler = make_noise_scheduler(run_config.diffusion)
        self.aux_train: torch.Tensor | None = None
        self.aux_heldout: torch.Tensor | None = None
        self._model: torch.nn.Module | None = None
        self._trainer: DiffusionTrainer | None = None  # Adam's moments last across corrections
        self._batches = None
        self._saved_trainer: tuple[dict, int] | None = None  # from a checkpoint, until used

    def state_dict(self) -> dict:
        """What a resumed cloud needs: the auxiliary set, FedDDPM+'s loss history and the
        server optimiser (Adam state, noise generator, batch position)."""
        state = {"aux_train": self.aux_train, "aux_heldout": self.aux_heldout,
                 "history": list(self.slow.history)}
        if self._trainer is not None:
            state["trainer"] = self._trainer.state_dict()
            state["batches"] = self._batches.position
        elif self._saved_trainer is not None:
            state["trainer"], state["batches"] = self._saved_trainer
        return state

    def load_state_dict(self, state: dict) -> None:
        self.aux_train, self.aux_heldout = state["aux_train"], state["aux_heldout"]
        self.slow.history = list(state["history"])
        if "trainer" in state:
            self._saved_trainer = (state["trainer"], int(state["batches"]))

    def __repr__(self) -> str:
        return f"FedDDPM(plus={self.plus}, aux_samples={self.aux_samples})"

    @property
    def pretraining(self) -> bool:
        return self.aux_train is None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if not self.pretraining:
            return instructions
        # Every client pre-trains its own model: all of them take part in this round.
        sample = client_manager.all()
        config = {LOCAL_STEPS_KEY: self.pretrain_steps, PHASE_KEY: "pretrain"}
        template = instructions[0][1] if instructions else FitIns(parameters, {})
        return [(proxy, FitIns(parameters, {**template.config, **config}))
                for proxy in sample.values()]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self.pretraining:
            return None, self._build_auxiliary_set(results)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        model = self._server_model(parameters_to_ndarrays(parameters))
        loss = self.heldout_loss(model)
        correct = not self.plus or self.slow.observe(loss)
        metrics = {**metrics, "aux_loss": loss, "corrected": correct}
        if correct:
            start = time.perf_counter()
            self._fine_tune(model)
            metrics["aux_loss_after"] = self.heldout_loss(model)
            metrics["server_seconds"] = round(time.perf_counter() - start, 3)
            parameters = ndarrays_to_parameters(model_to_ndarrays(model))
            log.info("round %d: server correction, held-out aux loss %.4f -> %.4f",
                     server_round, loss, metrics["aux_loss_after"])
        return parameters, metrics

    def _build_auxiliary_set(self, results: list[tuple[ClientProxy, FitRes]]) -> dict[str, Scalar]:
        """Sample the auxiliary set from the clients' pre-trained models."""
        if not results:
            raise RuntimeError("FedDDPM: no client uploaded a pre-trained model")
        start = time.perf_counter()
        counts = shares([res.num_examples for _, res in results], self.aux_samples)
        batches = []
        for index, ((_, res), count) in enumerate(zip(results, counts, strict=True)):
            model = self._server_model(parameters_to_ndarrays(res.parameters))
            images = sample_images(model, self.cfg.diffusion, count, seed=self.cfg.seed + index,
                                   batch_size=self.cfg.evaluation.batch_size,
                                   noise_scheduler=self.noise_scheduler)
            batches.append(as_training_images(images))
        aux = torch.cat(batches)
        order = torch.randperm(len(aux), generator=torch.Generator().manual_seed(self.cfg.seed))
        heldout = max(1, int(round(self.holdout * len(aux))))
        self.aux_heldout, self.aux_train = aux[order[:heldout]], aux[order[heldout:]]
        seconds = time.perf_counter() - start
        log.info("auxiliary set: %d images from %d pre-trained client models in %.1f s "
                 "(%d held out)", len(aux), len(results), seconds, heldout)
        return {"phase": "pretrain", "aux_samples": len(aux), "aux_heldout": heldout,
                "aux_per_client": json.dumps(counts), "aux_seconds": round(seconds, 3)}

    def _server_model(self, arrays: list[np.ndarray]) -> torch.nn.Module:
        """The server's working copy of the U-Net holding ``arrays``."""
        if self._model is None:
            self._model = build_unet(architecture_from_json(self.architecture)).to(self.device)
        load_ndarrays(self._model, arrays)
        return self._model

    @torch.no_grad()
    def heldout_loss(self, model: torch.nn.Module) -> float:
        """DDPM loss on the held-out auxiliary images with fixed noise (comparable rounds)."""
        model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        images = self.aux_heldout.to(self.device)
        return float(ddpm_loss(model, self.noise_scheduler, images, generator))

    def _fine_tune(self, model: torch.nn.Module) -> None:
        """``server_steps`` Adam steps of the DDPM loss on the auxiliary training images."""
        if self._trainer is None:
            training = self.cfg.training.model_copy(
                update={"lr": self.server_lr, "warmup_steps": 0, "seed": self.cfg.seed}
            )
            self._trainer = DiffusionTrainer(model, self.noise_scheduler, training, self.device)
            labels = torch.zeros(len(self.aux_train), dtype=torch.long)  # unused, loader shape
            self._batches = endless_batches(TensorDataset(self.aux_train, labels),
                                            training.batch_size, self.cfg.seed, self.device)
            if self._saved_trainer is not None:
                trainer_state, position = self._saved_trainer
                self._trainer.load_state_dict(trainer_state)
                self._batches.seek(position)
                self._saved_trainer = None
        self._trainer.train(self._batches, self.server_steps)
