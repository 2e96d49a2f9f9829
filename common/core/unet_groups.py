"""The U-Net's parameter groups, for methods that share only parts of the model (FedDiffuse).

A ``diffusers.UNet2DModel`` state splits into three groups (FedDiffuse's, docs/methods.md):

* ``down``: the input convolution, the time embedding and the down blocks (the encoder);
* ``mid``: the bottleneck block;
* ``up``: the up blocks, the output norm and the output convolution (the decoder).

Tensors travel in ``state_dict`` order; a partial payload carries the tensors of the named
groups only, in that same order, so both ends derive the layout from the architecture alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import torch

GROUPS = ("down", "mid", "up")

# First component of a state-dict key -> its group.
_PREFIX_GROUP = {
    "conv_in": "down",
    "time_proj": "down",
    "time_embedding": "down",
    "class_embedding": "down",
    "down_blocks": "down",
    "mid_block": "mid",
    "up_blocks": "up",
    "conv_norm_out": "up",
    "conv_act": "up",
    "conv_out": "up",
}


def group_of(key: str) -> str:
    """The group of a state-dict key; an unknown top-level module is an error, not a guess."""
    prefix = key.split(".", 1)[0]
    if prefix not in _PREFIX_GROUP:
        raise ValueError(f"tensor {key!r} belongs to no U-Net group (down, mid, up)")
    return _PREFIX_GROUP[prefix]


def parse_groups(text: str | None) -> tuple[str, ...]:
    """``"up,mid"`` -> ``("mid", "up")`` in U-Net order; ``None`` or ``""`` means every group."""
    if not text:
        return GROUPS
    names = {part.strip() for part in str(text).split(",") if part.strip()}
    unknown = names - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown U-Net group(s) {sorted(unknown)}; allowed: {list(GROUPS)}")
    return tuple(group for group in GROUPS if group in names)


def format_groups(groups: Iterable[str]) -> str:
    """The wire form of a group set (U-Net order, comma-separated)."""
    return ",".join(parse_groups(",".join(groups)))


def is_everything(groups: Sequence[str]) -> bool:
    return tuple(groups) == GROUPS


def group_indices(names: Sequence[str], groups: Sequence[str]) -> list[int]:
    """Positions (in wire order) of the tensors that belong to ``groups``."""
    wanted = set(groups)
    return [index for index, name in enumerate(names) if group_of(name) in wanted]


def select(arrays: Sequence[np.ndarray], indices: Sequence[int]) -> list[np.ndarray]:
    return [arrays[index] for index in indices]


def merge(
    base: Sequence[np.ndarray], part: Sequence[np.ndarray], indices: Sequence[int]
) -> list[np.ndarray]:
    """``base`` with the tensors at ``indices`` replaced by ``part`` (shapes must agree)."""
    if len(part) != len(indices):
        raise ValueError(f"{len(part)} tensors for {len(indices)} positions")
    merged = list(base)
    for index, array in zip(indices, part, strict=True):
        if array.shape != base[index].shape:
            raise ValueError(
                f"tensor {index} has shape {array.shape}, expected {base[index].shape}"
            )
        merged[index] = array
    return merged


@lru_cache(maxsize=8)
def _names_of(arch_json: str) -> tuple[str, ...]:
    from fedphd.common.core.models import (
        build_unet,  # models imports pruning; keep this module light
    )

    # The meta device builds the module tree without allocating or initialising weights.
    with torch.device("meta"):
        model = build_unet(json.loads(arch_json))
    return tuple(model.state_dict().keys())


def tensor_names(arch_json: str) -> list[str]:
    """State-dict keys (the wire order) of the U-Net an architecture JSON describes."""
    return list(_names_of(arch_json))


def group_sizes(names: Sequence[str], arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Bytes per group of a model state (what sharing that group costs per message)."""
    sizes = dict.fromkeys(GROUPS, 0)
    for name, array in zip(names, arrays, strict=True):
        sizes[group_of(name)] += array.nbytes
    return sizes
