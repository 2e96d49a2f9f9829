"""Process-level set-up shared by every role: torch threads, seeds, device."""

from __future__ import annotations

import random

import numpy as np
import torch
from tqdm.auto import tqdm

from fedphd.common.settings.config import ConfigError, TrainingConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup_torch(cfg: TrainingConfig, device: str | None = None) -> torch.device:
    """Apply the thread count and return the device, refusing a GPU that is not there."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    name = device or cfg.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device = {name!r}, but torch sees no CUDA GPU here")
    return torch.device(name)


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A tqdm bar that shows on a terminal and stays quiet in logs and pipes.

    The one rule for every bar of the package (diffusers' sampling bar too, see
    ``sample_images``): ``disable=None``, tqdm's "only when its stream is a terminal", since
    a bar in a file is one line of carriage returns thousands of characters long. Close it
    before logging the line that follows it (a closing bar redraws itself).
    """
    return tqdm(total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True)
