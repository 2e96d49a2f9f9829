"""PNG sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import save_image

MIN_CELL_PIXELS = 48  # small images (16x16 digits) are enlarged so a grid is legible


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``N x H x W x C`` images in [0, 1] as one PNG grid (square-ish by default).

    Images smaller than ``MIN_CELL_PIXELS`` are enlarged by an integer factor with
    nearest-neighbour sampling, so each generated pixel stays a visible square.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    factor = max(1, math.ceil(MIN_CELL_PIXELS / batch.shape[-1]))
    if factor > 1:
        batch = F.interpolate(batch, scale_factor=factor, mode="nearest")
    save_image(batch.clamp(0, 1), path, nrow=nrow or max(1, math.ceil(math.sqrt(len(batch)))))
    return path
