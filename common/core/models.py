"""U-Net presets and the architecture description that travels with the weights.

A model is a ``diffusers.UNet2DModel``. Its architecture is its diffusers config (a JSON-able
dict), so a receiver rebuilds the exact model from the instruction's config before it loads
tensors; no pickled module ever crosses the wire.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel

from fedphd.common.core.pruning import build_model
from fedphd.common.settings.config import ModelConfig

_CIFAR_BLOCKS: dict[str, Any] = {
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "dropout": 0.1,
}

PRESETS: dict[str, dict[str, Any]] = {
    # 16x16 grey, ~1.1 M parameters: a training step takes ~0.2 s on one CPU core.
    "tiny": {
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "dropout": 0.0,
    },
    # The FedPhD / DDPM reference U-Net for CIFAR-10: 35,746,307 parameters.
    "ddpm-cifar10": {"sample_size": 32, "in_channels": 3, "out_channels": 3, **_CIFAR_BLOCKS},
    # CelebA 64x64 uses the same blocks at a larger resolution.
    "celeba64": {"sample_size": 64, "in_channels": 3, "out_channels": 3, **_CIFAR_BLOCKS},
}


def unet_config(cfg: ModelConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments of a preset with the config's overrides applied."""
    arch = dict(PRESETS[cfg.preset])
    for key in ("sample_size", "in_channels", "layers_per_block", "dropout"):
        value = getattr(cfg, key)
        if value is not None:
            arch[key] = value
    if cfg.in_channels is not None:
        arch["out_channels"] = cfg.in_channels
    if cfg.block_out_channels is not None:
        if len(cfg.block_out_channels) != len(arch["down_block_types"]):
            raise ValueError(
                f"model.block_out_channels needs {len(arch['down_block_types'])} entries for "
                f"preset {cfg.preset!r}, got {cfg.block_out_channels}"
            )
        arch["block_out_channels"] = list(cfg.block_out_channels)
    return arch


def build_unet(arch: dict[str, Any], seed: int | None = None) -> UNet2DModel:
    """Build a U-Net (pruned when ``arch`` records pruned shapes); ``seed`` makes the initial
    weights reproducible."""
    if seed is None:
        return build_model(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch)


def architecture_of(model: UNet2DModel) -> dict[str, Any]:
    """The JSON-able architecture of a model (its diffusers config, without private keys)."""
    return {
        key: (list(value) if isinstance(value, tuple) else value)
        for key, value in dict(model.config).items()
        if not key.startswith("_")
    }


def architecture_to_json(arch: dict[str, Any]) -> str:
    return json.dumps(arch, sort_keys=True)


def architecture_from_json(text: str) -> dict[str, Any]:
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"architecture JSON is not valid JSON: {error}") from None
    if not isinstance(arch, dict):
        raise ValueError("architecture JSON must be an object of UNet2DModel arguments")
    return arch


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_to_ndarrays(model: torch.nn.Module) -> list[np.ndarray]:
    """Copies of all state tensors in ``state_dict`` order (the wire order).

    Copies, not views: a CPU tensor's ``.numpy()`` shares memory with the parameter, so a
    snapshot taken before training would silently follow the training.
    """
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


StateTensors = Mapping[str, torch.Tensor]


def model_views(model: torch.nn.Module, state: StateTensors | None = None) -> list[np.ndarray]:
    """The state tensors in wire order as numpy views of a CPU model's own storage (copies
    from another device): for reading at once, e.g. to encode an answer; they change with
    the model. ``state``: the model's ``state_dict()`` when the caller keeps it (its tensors
    share the parameters' storage for the model's life; building it walks every module)."""
    state = model.state_dict() if state is None else state
    return [t.detach().cpu().numpy() for t in state.values()]


def load_ndarrays(model: torch.nn.Module, arrays: list[np.ndarray],
                  state: StateTensors | None = None) -> None:
    """Load tensors in ``state_dict`` order, refusing any count or shape mismatch
    (``state`` as for :func:`model_views`)."""
    state = model.state_dict() if state is None else state
    if len(arrays) != len(state):
        raise ValueError(f"expected {len(state)} tensors for this model, got {len(arrays)}")
    for (name, current), array in zip(state.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(
                f"tensor {name}: expected shape {tuple(current.shape)}, got {tuple(array.shape)}"
            )
    # Into the parameters' own storage (``state_dict`` tensors share it). On the CPU a numpy
    # copy: one thread, as fast as torch's parallel copy (memory-bound) but without waking
    # torch's thread pool, whose spinning threads slow a busy machine's other processes.
    with torch.no_grad():
        for current, array in zip(state.values(), arrays, strict=True):
            if current.device.type == "cpu" and current.dtype != torch.bfloat16:
                target = current.numpy()
                if not np.may_share_memory(target, array):  # not a view of itself
                    np.copyto(target, np.asarray(array), casting="unsafe")
            else:
                current.copy_(torch.as_tensor(np.asarray(array)).to(current.dtype))
