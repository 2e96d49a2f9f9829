"""``fedphd evaluate``: score a saved model's samples from the command line
(:func:`fedphd.common.quality.evaluation.evaluate_model` does the work)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedphd.common.commands.cli import add_config_args, config_from_args
from fedphd.common.core.diffusion import load_model
from fedphd.common.quality.evaluation import evaluate_model, format_summary
from fedphd.common.quality.metrics import InceptionWeightsUnavailable, default_cache_dir
from fedphd.common.settings.config import RunConfig
from fedphd.common.settings.runtime import setup_torch


def _json_ready(result: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; a diverged model's distance is reported as null rather than a token
    # that strict parsers reject.
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in result.items()}


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _run_config(args: argparse.Namespace) -> RunConfig:
    """``--config``, else the ``config.toml`` of the run folder the model sits in, else the
    packaged default: scoring a CIFAR-10 model against digits would be silently wrong."""
    run_config = Path(args.model).parent / "config.toml"
    if args.config is None and run_config.is_file():
        args.config = str(run_config)
        print(f"fedphd evaluate: using the run's configuration {run_config}", file=sys.stderr)
    return config_from_args(args)


def run(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    device = setup_torch(cfg.training, args.device)
    try:
        model, noise_scheduler = load_model(args.model)
        result = evaluate_model(
            model, noise_scheduler, cfg, device, num_samples=args.n, steps=args.steps,
            seed=args.seed, inception_weights=args.inception_weights, cache_dir=args.cache_dir,
            max_real_images=args.max_real,
        )
    except (FileNotFoundError, InceptionWeightsUnavailable) as error:
        print(f"fedphd evaluate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(_json_ready(result)) if args.json else format_summary(result))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="score a saved model's samples (fd_classifier, and FID when weights are present)",
        description="Sample a saved diffusers-format model with DDIM and compare the samples "
        "with the real training images: fd_classifier (Fréchet distance in a small CNN's "
        "feature space, offline) and FID (pytorch-fid Inception; needs its weights file).",
    )
    add_config_args(parser)
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="saved model folder; without --config, the config.toml next to "
                        "it (a run folder's) is used when present")
    parser.add_argument("--n", type=_count(2), metavar="N",
                        help="generated images, at least 2 (default: evaluation.num_samples)")
    parser.add_argument("--steps", type=_count(1),
                        help="DDIM steps (default: diffusion.sampling_steps)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    parser.add_argument("--inception-weights", metavar="FILE",
                        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: "
                        "torch hub's cache, $TORCH_HOME/hub/checkpoints/)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: training.device)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help=f"real-data statistics and classifier cache (default: "
                        f"{default_cache_dir()})")
    parser.add_argument("--max-real", type=_count(2), default=None, metavar="N",
                        help="real training images the statistics use, a fixed random subset "
                        "when there are more (default: evaluation.max_real_images)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)
