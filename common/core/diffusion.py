"""DDPM training (epsilon prediction) and DDIM sampling with diffusers' schedulers and pipeline."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from torch.utils.data import DataLoader, Dataset

from fedphd.common.core import pruned_unet
from fedphd.common.core.pruning import (
    PrunedUNet2DModel,
    load_pretrained,
    pruned_shapes,
    to_pruned_model,
)
from fedphd.common.settings.config import DiffusionConfig, TrainingConfig


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


class BatchStream(Iterator[torch.Tensor]):
    """Shuffled image batches forever. Epoch ``e`` visits the images in a permutation seeded
    by ``(seed, e)``, so the number of batches drawn (:attr:`position`) is the stream's whole
    state: :meth:`seek` returns to any earlier point (a client replaying a round) without
    reading the skipped images."""

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, device: torch.device,
        position: int = 0,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot draw batches from an empty data set")
        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.seed = seed
        self.device = device
        # As DataLoader(drop_last=True) when there is more than one batch: equal batch sizes.
        self.drop_last = len(dataset) >= batch_size
        self.position = 0
        self._loader: Iterator | None = None
        self.seek(position)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The index batches of one epoch."""
        seed = np.random.SeedSequence([self.seed % 2**63, epoch]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        return [order[start:start + self.batch_size]
                for start in range(0, self.batches_per_epoch * self.batch_size,
                                   self.batch_size)]

    def seek(self, position: int) -> None:
        """Continue from ``position`` batches into the stream."""
        if position < 0:
            raise ValueError(f"a batch stream position is >= 0, got {position}")
        self.position = position
        self._loader = self._batches_from(position)

    def _batches_from(self, position: int) -> Iterator[torch.Tensor]:
        epoch, offset = divmod(position, self.batches_per_epoch)
        while True:
            sampler = self.epoch_batches(epoch)[offset:]
            # Pinned host memory lets the copy to a GPU run asynchronously.
            for images, _labels in DataLoader(self.dataset, batch_sampler=sampler,
                                              pin_memory=self.device.type == "cuda"):
                yield images.to(self.device, non_blocking=True)
            epoch, offset = epoch + 1, 0

    def __next__(self) -> torch.Tensor:
        batch = next(self._loader)
        self.position += 1
        return batch


def endless_batches(
    dataset: Dataset, batch_size: int, seed: int, device: torch.device
) -> BatchStream:
    """Shuffled image batches forever (a new seeded epoch order each pass)."""
    return BatchStream(dataset, batch_size, seed, device)


# ``training.mixed_precision``: the autocast dtype of the forward pass (None: fp32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "no": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}


class DiffusionTrainer:
    """Adam with linear warm-up and gradient clipping, as the DDPM reference trains.

    The optimiser state and step counter live as long as the trainer: a client keeps its own
    trainer across rounds (never shared between clients) and only the weights are replaced.

    ``training.mixed_precision`` runs the U-Net's forward pass (and so its backward) under
    ``torch.autocast`` in bf16 or fp16; the weights, Adam's state, every extra loss term and
    the answers stay fp32. fp16 scales the loss (``torch.amp.GradScaler``) against gradient
    underflow, and unscales before gradient hooks and clipping, so both see true gradients;
    a step with non-finite gradients is skipped, as the scaler does.
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
        self.autocast_dtype = AUTOCAST_DTYPES[cfg.mixed_precision]
        # Disabled (every call a no-op, the fp32 path unchanged) unless fp16.
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")

    def train_step(self, images: torch.Tensor, extra_loss=None, gradient_hook=None) -> float:
        """One optimiser step on a batch; ``extra_loss(model)`` adds a regulariser and
        ``gradient_hook(model)`` may read and correct the gradients before clipping."""
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            loss = ddpm_loss(self.model, self.scheduler, images, self.generator).float()
        total = loss if extra_loss is None else loss + extra_loss(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        if gradient_hook is not None:
            gradient_hook(self.model)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        self.steps_done += 1
        return float(loss.detach())

    def state_dict(self) -> dict:
        """Everything training carries from one step to the next besides the weights: Adam's
        moments, the warm-up position, the noise generator and the step count."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "generator": self.generator.get_state(),
            "steps_done": self.steps_done,
            "scaler": self.scaler.state_dict(),  # empty unless fp16
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        self.steps_done = int(state["steps_done"])
        if state.get("scaler") and self.scaler.is_enabled():  # saved by an fp16 trainer
            self.scaler.load_state_dict(state["scaler"])

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
    # disable=None: tqdm shows the bar on a terminal only (never in a log file).
    pipeline.set_progress_bar_config(disable=None if show_progress else True, leave=False)
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


MODEL_INDEX = "model_index.json"
"""The file that makes a folder a diffusers pipeline (its components and their classes)."""

REMOTE_CODE_FILE = Path(pruned_unet.__file__).name
"""The pruned U-Net's code, copied into ``unet/`` of a saved pruned model."""

# What save_pretrained of a lone model and its scheduler put at the top of a folder: the flat
# layout save_model wrote before models became pipeline folders.
_FLAT_LAYOUT = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")


def model_pipeline(model: UNet2DModel, cfg: DiffusionConfig) -> DDPMPipeline:
    """The U-Net and its training noise schedule as the diffusers pipeline a run saves.

    A pruned U-Net's component entry names the code file shipped in ``unet/`` instead of its
    Python module: that is where ``DiffusionPipeline.from_pretrained(..., trust_remote_code=
    True)`` looks for a custom component's class.
    """
    pipeline = DDPMPipeline(unet=model, scheduler=make_noise_scheduler(cfg))
    if isinstance(model, PrunedUNet2DModel):
        pipeline.register_to_config(unet=(Path(REMOTE_CODE_FILE).stem, type(model).__name__))
    return pipeline


def save_model(model: UNet2DModel, cfg: DiffusionConfig, directory: str | Path) -> Path:
    """Save as a diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``):
    ``DDPMPipeline.from_pretrained(directory)`` and ``DDIMPipeline.from_pretrained(directory)``
    load it. A pruned U-Net also carries its class as code (``unet/pruned_unet.py``, named by
    ``auto_map`` in ``unet/config.json``), loaded with ``trust_remote_code=True``."""
    directory = Path(directory)
    if not isinstance(model, PrunedUNet2DModel) and pruned_shapes(model):
        model = to_pruned_model(model)  # pruned in place: only the pruned class rebuilds it
    model_pipeline(model, cfg).save_pretrained(directory)
    code = directory / "unet" / REMOTE_CODE_FILE
    if isinstance(model, PrunedUNet2DModel):
        shutil.copyfile(pruned_unet.__file__, code)
    else:
        code.unlink(missing_ok=True)  # from a pruned model saved here before
    _remove_flat_layout(directory)
    return directory


def _remove_flat_layout(directory: Path) -> None:
    """Delete an old flat model saved in ``directory`` before (a client's state folder from an
    earlier version): its stale weights would sit beside the new ones. Only when the top
    ``config.json`` is a U-Net's, so no file of anyone else's is touched."""
    config = directory / "config.json"
    if not config.is_file():
        return
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        return
    if class_name in ("UNet2DModel", PrunedUNet2DModel.__name__):
        for name in _FLAT_LAYOUT:
            (directory / name).unlink(missing_ok=True)


def is_saved_model(directory: str | Path) -> bool:
    """Whether ``directory`` holds a model :func:`load_model` reads (either layout)."""
    directory = Path(directory)
    return (directory / MODEL_INDEX).is_file() or (directory / "config.json").is_file()


def load_model(directory: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a model saved by :func:`save_model` (U-Net and its noise schedule): a pipeline
    folder, or the flat folder (U-Net config, weights and scheduler config side by side) that
    runs wrote before."""
    directory = Path(directory)
    if (directory / MODEL_INDEX).is_file():
        scheduler = DDPMScheduler.from_pretrained(str(directory), subfolder="scheduler")
    elif (directory / "config.json").is_file():
        scheduler = DDPMScheduler.from_pretrained(str(directory))
    else:
        raise FileNotFoundError(
            f"{directory} holds no diffusers model ({MODEL_INDEX} and config.json missing)"
        )
    return load_pretrained(directory), scheduler
