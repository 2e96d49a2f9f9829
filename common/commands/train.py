"""``fedphd train``: centralised DDPM training on the whole data set (the reference point that
federated runs are compared with, and the quickest way to check a data set and a preset)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fedphd.common.commands.cli import add_config_args, config_from_args
from fedphd.common.core.diffusion import (
    DiffusionTrainer,
    endless_batches,
    make_noise_scheduler,
    sample_images,
    save_model,
)
from fedphd.common.core.images import save_grid
from fedphd.common.core.models import build_unet, count_parameters, unet_config
from fedphd.common.data.datasets import load_dataset
from fedphd.common.quality.tracking import check_tracking, track_training
from fedphd.common.settings.config import RunConfig
from fedphd.common.settings.runtime import progress_bar, seed_everything, setup_torch

log = logging.getLogger("fedphd.train")


def train_centrally(cfg: RunConfig, steps: int, out: Path) -> dict:
    """Train one model on all training images for ``steps`` steps; save model and samples."""
    check_tracking(cfg.output)  # a missing optional package fails before training
    seed_everything(cfg.seed)
    device = setup_torch(cfg.training)
    arch = unet_config(cfg.model)
    dataset = load_dataset(cfg.data, arch["sample_size"], arch["in_channels"])
    model = build_unet(arch, seed=cfg.seed)
    trainer = DiffusionTrainer(model, make_noise_scheduler(cfg.diffusion), cfg.training, device)
    batches = endless_batches(dataset, cfg.training.batch_size, cfg.training.seed, device)
    log.info("training %d-parameter U-Net on %d images", count_parameters(model), len(dataset))
    with progress_bar(steps, "train", cfg.output.progress) as bar:
        losses = trainer.train(batches, steps, progress=bar)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, cfg.diffusion, out / "model")
    images = sample_images(model, cfg.diffusion, cfg.output.grid_samples, seed=cfg.seed)
    save_grid(images, out / "samples.png")
    track_training(cfg.output, out, losses, out / "samples.png")
    summary = {
        "steps": steps,
        "images": len(dataset),
        "first_loss": losses[0],
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out or cfg.output.dir)
    summary = train_centrally(cfg, args.steps, out)
    print(json.dumps(summary))
    print(f"model: {out / 'model'}  samples: {out / 'samples.png'}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train one model centrally on the whole data set (no federation)",
        description="Centralised DDPM training on all training images: the baseline that "
        "federated runs are compared with.",
    )
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps (default 500)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: output.dir)")
    parser.set_defaults(run=run)
