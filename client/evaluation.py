"""A client's evaluation of its own model (partial sharing: every client's model differs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from fedphd.common.core.diffusion import sample_images
from fedphd.common.core.images import save_grid
from fedphd.common.quality.evaluation import evaluate_model
from fedphd.common.settings.config import RunConfig
from fedphd.common.wire.keys import CLIENT_ID_METRIC
from fedphd.common.wire.transport import Code, EvaluateRes, Status, ok_status


def evaluate_own_model(model: UNet2DModel, scheduler: DDPMScheduler, cfg: RunConfig,
                       device: torch.device, samples: Path) -> dict[str, Any]:
    """Sample quality of ``model``; a grid of its samples goes to ``samples``."""
    result = evaluate_model(model, scheduler, cfg, device, show_progress=False)
    grid = sample_images(model, cfg.diffusion, cfg.output.grid_samples, seed=cfg.seed,
                         steps=cfg.evaluation.sampling_steps)
    save_grid(grid, samples)
    return result


def evaluation_answer(client_id: int, result: dict[str, Any]) -> EvaluateRes:
    """The result's scalars as metrics; the loss is the classifier Fréchet distance."""
    return EvaluateRes(
        status=ok_status(),
        loss=float(result["fd_classifier"]),
        num_examples=int(result["num_samples"]),
        metrics={CLIENT_ID_METRIC: client_id,
                 **{k: v for k, v in result.items() if isinstance(v, int | float | str)}},
    )


def failed_evaluation(client_id: int, error: Exception) -> EvaluateRes:
    # Flower's legacy protocol has no generic error code; the message says what failed.
    return EvaluateRes(
        status=Status(code=Code.EVALUATE_NOT_IMPLEMENTED, message=f"evaluation failed: {error}"),
        loss=0.0, num_examples=0, metrics={CLIENT_ID_METRIC: client_id},
    )
