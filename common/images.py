"""PNG sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``N x H x W x C`` images in [0, 1] as one PNG grid (square-ish by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    save_image(batch.clamp(0, 1), path, nrow=nrow or max(1, math.ceil(math.sqrt(len(batch)))))
    return path
