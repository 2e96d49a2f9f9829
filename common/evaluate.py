"""``fedphd evaluate``: sample quality of a saved model, as Fréchet distances to real data.

Always reports ``fd_classifier`` (offline: a small CNN trained on the run's own data set, see
``common.metrics``); adds ``fid`` (pytorch-fid's Inception) when its weights file is on this
machine, and otherwise says why it is missing in ``fid_unavailable``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from common.cli import add_config_args, config_from_args
from common.config import RunConfig
from common.diffusion import load_model, sample_images
from common.metrics import (
    FrechetDistanceError,
    InceptionWeightsUnavailable,
    Reference,
    classifier_fd,
    default_cache_dir,
    fid,
    load_fid_inception,
    resolve_inception_weights,
)
from common.runtime import setup_torch


def _fid_weights(
    inception_weights: str | Path | None, device: torch.device | str
) -> tuple[Path | None, str]:
    """The Inception weights file, or ``None`` and why FID is skipped.

    Loaded here, before any sampling, so a missing or wrong file given explicitly fails in
    seconds; the loaded network is cached for the FID computation itself.
    """
    try:
        weights = resolve_inception_weights(inception_weights)
    except InceptionWeightsUnavailable as error:
        if inception_weights is not None:
            raise
        return None, str(error)
    load_fid_inception(weights, device)
    return weights, ""


def evaluate_model(
    model: UNet2DModel,
    noise_scheduler: DDPMScheduler | None,
    cfg: RunConfig,
    device: torch.device | str,
    *,
    num_samples: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    inception_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    max_real_images: int | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Sample ``num_samples`` images with DDIM and score them against the real training set.

    Returns ``{"fd_classifier", "num_samples", "sampling_steps", "seed", "dataset",
    "image_size", "channels", "seconds"}`` plus ``"fid"`` when Inception weights are found
    (``inception_weights``, else torch hub's cache) or ``"fid_unavailable"`` with the reason.
    An explicit ``inception_weights`` file that is missing or wrong raises
    ``InceptionWeightsUnavailable`` instead: the caller asked for FID.

    Defaults: ``cfg.evaluation.num_samples`` images, ``cfg.diffusion.sampling_steps`` DDIM
    steps, ``cfg.seed`` as sampling seed, ``common.metrics.default_cache_dir()`` for the
    real-data statistics and the classifier, and at most ``max_real_images`` real training
    images (a fixed random subset when the split is larger). Image size and channels come
    from the model.
    """
    start = time.perf_counter()
    evaluation = cfg.evaluation
    weights, unavailable = _fid_weights(inception_weights or evaluation.fid_weights, device)
    count = num_samples or evaluation.num_samples
    steps = steps or evaluation.sampling_steps or cfg.diffusion.sampling_steps
    cache_dir = cache_dir or evaluation.cache_dir
    max_real_images = max_real_images or evaluation.max_real_images
    seed = cfg.seed if seed is None else seed
    progress = cfg.output.progress if show_progress is None else show_progress
    batch_size = cfg.evaluation.batch_size
    images = sample_images(
        model.to(device), cfg.diffusion, count, seed=seed, batch_size=batch_size,
        steps=steps, show_progress=progress, noise_scheduler=noise_scheduler,
    )
    reference = Reference(
        cfg.data, int(model.config.sample_size), int(model.config.in_channels),
        Path(cache_dir) if cache_dir is not None else default_cache_dir(), max_real_images,
    )
    result: dict[str, Any] = {
        "fd_classifier": classifier_fd(
            images, reference, device=device, show_progress=progress
        ),
        "num_samples": count,
        "sampling_steps": steps,
        "seed": seed,
        "dataset": cfg.data.dataset,
        "image_size": reference.image_size,
        "channels": reference.channels,
    }
    if weights is not None:
        try:
            result["fid"] = fid(images, reference, weights, device=device,
                                batch_size=batch_size, show_progress=progress)
            result["inception_weights"] = str(weights)
        except FrechetDistanceError as error:
            unavailable = f"FID from {count} samples: {error}"
    if "fid" not in result:
        result["fid_unavailable"] = unavailable
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A few human-readable lines for the terminal."""
    lines = [
        f"fd_classifier {result['fd_classifier']:.4g}  (Fréchet distance in the feature space "
        f"of a small CNN trained on {result['dataset']}; not FID)",
    ]
    if "fid" in result:
        lines.append(f"fid           {result['fid']:.4g}  (pytorch-fid Inception pool3)")
    else:
        lines.append(f"fid           unavailable: {result['fid_unavailable']}")
    lines.append(
        f"{result['num_samples']} samples, {result['sampling_steps']} DDIM steps, seed "
        f"{result['seed']}, {result['image_size']}x{result['image_size']}x"
        f"{result['channels']}, {result['seconds']:.1f} s"
    )
    return "\n".join(lines)


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
