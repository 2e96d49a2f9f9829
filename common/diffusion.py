"""DDPM training (epsilon prediction) and DDIM sampling with diffusers' schedulers and pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from torch.utils.data import DataLoader, Dataset

from common.config import DiffusionConfig, TrainingConfig
from common.pruning import load_pretrained


def make_noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
    )


def ddpm_loss(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``E_{t,eps} ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2``."""
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    steps = torch.randint(
        0,
        scheduler.config.num_train_timesteps,
        (images.shape[0],),
        generator=generator,
        device=images.device,
    )
    noisy = scheduler.add_noise(images, noise, steps)
    return F.mse_loss(model(noisy, steps).sample, noise)


def endless_batches(
    dataset: Dataset, batch_size: int, seed: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Shuffled image batches forever (a new epoch order from the seeded generator each pass)."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        shuffle=True,
        drop_last=len(dataset) >= batch_size,
        generator=generator,
    )
    while True:
        for images, _labels in loader:
            yield images.to(device)


class DiffusionTrainer:
    """Adam with linear warm-up and gradient clipping, as the DDPM reference trains.

    The optimiser state and step counter live as long as the trainer: a client keeps its own
    trainer across rounds (never shared between clients) and only the weights are replaced.
    """

    def __init__(
        self,
        model: UNet2DModel,
        scheduler: DDPMScheduler,
        cfg: TrainingConfig,
        device: torch.device,
    ) -> None:
        self.model = model.to(device)
        self.scheduler = scheduler
        self.cfg = cfg
        self.device = device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        warmup = max(1, cfg.warmup_steps)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.steps_done = 0

    def train_step(self, images: torch.Tensor, extra_loss=None, gradient_hook=None) -> float:
        """One optimiser step on a batch; ``extra_loss(model)`` adds a regulariser and
        ``gradient_hook(model)`` may read and correct the gradients before clipping."""
        self.model.train()
        loss = ddpm_loss(self.model, self.scheduler, images, self.generator)
        total = loss if extra_loss is None else loss + extra_loss(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if gradient_hook is not None:
            gradient_hook(self.model)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.steps_done += 1
        return float(loss.detach())

    def train(
        self, batches: Iterator[torch.Tensor], steps: int, progress=None, extra_loss=None,
        gradient_hook=None,
    ) -> list[float]:
        losses = []
        for _ in range(steps):
            losses.append(self.train_step(next(batches), extra_loss, gradient_hook))
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.4f}")
        return losses


def ddim_pipeline(
    model: UNet2DModel, cfg: DiffusionConfig, noise_scheduler: DDPMScheduler | None = None
) -> DDIMPipeline:
    """A DDIM pipeline on the model's training noise schedule (from ``cfg`` unless given)."""
    noise_scheduler = noise_scheduler or make_noise_scheduler(cfg)
    return DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(noise_scheduler.config))


@torch.no_grad()
def sample_images(
    model: UNet2DModel,
    cfg: DiffusionConfig,
    num_images: int,
    seed: int = 0,
    batch_size: int = 64,
    steps: int | None = None,
    show_progress: bool = False,
    noise_scheduler: DDPMScheduler | None = None,
) -> np.ndarray:
    """DDIM samples as an ``N x H x W x C`` float array in [0, 1]."""
    pipeline = ddim_pipeline(model.eval(), cfg, noise_scheduler)
    pipeline.set_progress_bar_config(disable=not show_progress, leave=False)
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        generator = torch.Generator(device=device).manual_seed(seed + start)
        out = pipeline(
            batch_size=count,
            generator=generator,
            eta=cfg.eta,
            num_inference_steps=steps or cfg.sampling_steps,
            output_type="np",
        )
        chunks.append(out.images)
    return np.concatenate(chunks, axis=0)


def save_model(model: UNet2DModel, cfg: DiffusionConfig, directory: str | Path) -> Path:
    """Save in diffusers format: ``UNet2DModel.from_pretrained(directory)`` loads the U-Net and
    ``DDPMScheduler.from_pretrained(directory)`` its noise schedule."""
    directory = Path(directory)
    model.save_pretrained(directory)
    make_noise_scheduler(cfg).save_pretrained(directory)
    return directory


def load_model(directory: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a model saved by :func:`save_model` (U-Net and its noise schedule)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no diffusers model (config.json missing)")
    return load_pretrained(directory), DDPMScheduler.from_pretrained(str(directory))
