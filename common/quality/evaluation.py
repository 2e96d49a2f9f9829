"""``fedphd evaluate``: sample quality of a saved model, as Fréchet distances to real data.

Always reports ``fd_classifier`` (offline: a small CNN trained on the run's own data set, see
``fedphd.common.quality.metrics``); adds ``fid`` (pytorch-fid's Inception) when its weights file
is on this
machine, and otherwise says why it is missing in ``fid_unavailable``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from fedphd.common.core.diffusion import sample_images
from fedphd.common.quality.metrics import (
    FrechetDistanceError,
    InceptionWeightsUnavailable,
    Reference,
    classifier_fd,
    default_cache_dir,
    fid,
    load_fid_inception,
    resolve_inception_weights,
)
from fedphd.common.settings.config import RunConfig


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
    steps, ``cfg.seed`` as sampling seed,
    ``fedphd.common.quality.metrics.default_cache_dir()`` for the
    real-data statistics and the classifier, and at most ``max_real_images`` real training
    images (a fixed random subset when the split is larger). Image size and channels come
    from the model.
    """
    start = time.perf_counter()  # the FID network's loading counts too
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
    result.update(_fid_result(images, reference, weights, unavailable, device, batch_size,
                              progress))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _fid_result(
    images: torch.Tensor, reference: Reference, weights: Path | None, unavailable: str,
    device: torch.device | str, batch_size: int, progress: bool,
) -> dict[str, Any]:
    """``fid`` and the weights it used, or ``fid_unavailable`` with the reason."""
    if weights is not None:
        try:
            return {"fid": fid(images, reference, weights, device=device,
                               batch_size=batch_size, show_progress=progress),
                    "inception_weights": str(weights)}
        except FrechetDistanceError as error:
            unavailable = f"FID from {len(images)} samples: {error}"
    return {"fid_unavailable": unavailable}


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
