"""``fedphd sample``: a PNG grid of DDIM samples from a saved model."""

from __future__ import annotations

import argparse
import sys

from fedphd.common.commands.cli import add_config_args, config_from_args
from fedphd.common.core.diffusion import load_model, sample_images
from fedphd.common.core.images import save_grid
from fedphd.common.settings.runtime import setup_torch


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    device = setup_torch(cfg.training, args.device)
    try:
        model, noise_scheduler = load_model(args.model)
    except FileNotFoundError as error:  # one line naming the folder, as fedphd evaluate
        print(f"fedphd sample: {error}", file=sys.stderr)
        return 2
    images = sample_images(
        model.to(device),
        cfg.diffusion,
        args.n,
        seed=args.seed,
        batch_size=cfg.evaluation.batch_size,
        steps=args.steps,
        show_progress=cfg.output.progress,
        noise_scheduler=noise_scheduler,
    )
    print(save_grid(images, args.out))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sample",
        help="write a PNG grid of DDIM samples from a saved model",
        description="Sample a saved diffusers-format model with DDIM and write a PNG grid.",
    )
    add_config_args(parser)
    parser.add_argument("--model", required=True, metavar="DIR", help="saved model folder")
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", default="samples.png", metavar="FILE.png", help="PNG to write")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: diffusion.sampling_steps)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: training.device)")
    parser.set_defaults(run=run)
