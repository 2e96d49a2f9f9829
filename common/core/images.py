"""PNG sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

MIN_CELL_PIXELS = 48  # small images (16x16 digits) are enlarged so a grid is legible


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``N x H x W x C`` images in [0, 1] as one PNG grid (square-ish by default).

    Images smaller than ``MIN_CELL_PIXELS`` are enlarged by an integer factor with
    nearest-neighbour sampling, so each generated pixel stays a visible square.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = _legible(images)
    save_image(batch, path, nrow=nrow or _square_row(len(batch)))
    return path


def grid_array(images: np.ndarray, nrow: int | None = None) -> np.ndarray:
    """The grid :func:`save_grid` writes, as an ``H x W x 3`` float array in [0, 1] (for an
    experiment tracker)."""
    batch = _legible(images)
    grid = make_grid(batch, nrow=nrow or _square_row(len(batch)))
    return grid.permute(1, 2, 0).numpy()


def _legible(images: np.ndarray) -> torch.Tensor:
    """``N x C x H x W`` in [0, 1], enlarged by an integer factor when small."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    factor = max(1, math.ceil(MIN_CELL_PIXELS / batch.shape[-1]))
    if factor > 1:
        batch = F.interpolate(batch, scale_factor=factor, mode="nearest")
    return batch.clamp(0, 1)


def _square_row(count: int) -> int:
    return max(1, math.ceil(math.sqrt(count)))
